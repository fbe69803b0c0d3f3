"""The edge: what clients and operators speak to.

Root modules serve gRPC: the public Inference service (inference.py), the admin service on its unix socket
(admin.py), who may call (access.py) and the request metrics (metrics.py). http/ is the one HTTP stack and
what it serves. The edge reads the fleet through its snapshot and commands, routes through routing/, and
never changes a worker's state itself.

May import fleet/, memory/ and routing/; edge root modules never import edge/http/.
"""
