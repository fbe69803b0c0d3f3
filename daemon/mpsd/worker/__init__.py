"""The worker side: runs inside `python -m mpsd.worker`, never inside the daemon."""
