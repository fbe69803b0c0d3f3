"""Command-line entry points: `mpsd` (the daemon) and `mpsctl` (its operator client)."""
