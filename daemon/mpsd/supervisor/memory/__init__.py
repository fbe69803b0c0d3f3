"""Memory: what the machine has (probes), what a worker holds (footprints), and who may start or must go
(admission and the demand policy, pure functions over plain numbers and a clock).

Owns no worker state. Imports nothing of the supervisor above it: the fleet asks, and applies the answers.
"""
