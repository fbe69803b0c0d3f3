"""Exit codes a worker reserves, shared by the worker and the supervisor.

The supervisor must tell "cannot load the model" (a typo: stop at once) from
"crashed while serving" (restart with backoff); a reserved code says which
without parsing text. 78 is EX_CONFIG from sysexits.h.
"""

EXIT_BOOT_FAILURE = 78
