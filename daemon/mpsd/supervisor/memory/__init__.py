"""Memory: what the machine has (probes), what a worker's process tree holds now (process_memory), what one more
worker of a model will hold (footprints), and who may start or must go (admission and the demand policy, pure
functions over plain numbers and a clock).

Owns no worker state. Imports nothing of the supervisor above it: the fleet asks, and applies the answers.
"""
