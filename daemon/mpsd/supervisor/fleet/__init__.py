"""The fleet: every worker's lifecycle, owned in one place (fleet.py, one door for state: `Fleet._transition`).

Its parts: the states and their legal moves, worker records, the process launcher, exit classification,
the restart backoff, and three objects the fleet composes rather than inherits: health probes (health.py),
operator commands (commands.py) and applying demand (balancer.py). Each is handed only what it uses (the
fleet's workers, its doors such as `_transition`), so it is read in one file and tested without the others,
and state still changes only through the fleet. Readers get a read-only snapshot (snapshot.py).

May import memory/ (probes, footprints, admission, demand policy); never routing/ or edge/: what it needs
of the router's traffic comes in as the `ModelLoad` protocol.
"""
