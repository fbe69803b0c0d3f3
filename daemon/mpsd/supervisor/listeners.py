"""Binding the edge: the public gRPC server (with health and reflection), the admin socket, the HTTP edge.

Each function takes the parts it serves and the access settings, binds, and
returns the running server; a port that cannot be bound becomes a
ListenError worded for the operator. The daemon decides when they start and
stop.
"""

from __future__ import annotations

import logging
import os
import pathlib

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mpsd.config import DaemonConfig, ModelConfig, PublicAccess, split_listen
from mpsd.supervisor.edge.access import (
    AccessRule,
    BearerTokenInterceptor,
    describe,
    exposure_problem,
    server_credentials,
    server_ssl_context,
)
from mpsd.supervisor.edge.admin import AdminService
from mpsd.supervisor.edge.http.openai import OpenAIApi, error_body
from mpsd.supervisor.edge.http.routes import Routes
from mpsd.supervisor.edge.http.server import HttpServer
from mpsd.supervisor.edge.http.status_page import StatusPage
from mpsd.supervisor.edge.inference import InferenceService, add_inference_service
from mpsd.supervisor.edge.metrics import RequestMetrics
from mpsd.v1 import admin_pb2_grpc, inference_pb2

log = logging.getLogger("mpsd")


class ListenError(RuntimeError):
    """An address the edge cannot serve, worded for the operator."""


def serving_status(ready_workers: int, prospects: str | None) -> int:
    """SERVING while a request for the model would be served here: a READY worker, or one that may still come
    (loading, restarting, or demand may start one: Fleet.prospects is None). NOT_SERVING once none will, so that a
    client-side health check or a proxy sends the model's requests to another host."""
    if ready_workers or prospects is None:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


async def start_public(listen: str, access: PublicAccess, service: InferenceService,
                       health_servicer: health.aio.HealthServicer,
                       models: tuple[ModelConfig, ...]) -> tuple[grpc.aio.Server, str]:
    """The public gRPC port; returns the server and the address it bound (port 0 picks one)."""
    problem = exposure_problem(listen, access)
    if problem:
        raise ListenError(problem)
    interceptors = [BearerTokenInterceptor(AccessRule.of(access))] if access.token_file else []
    # Without so_reuseport 0, Linux lets a second daemon bind the same port and the two split the traffic.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    add_inference_service(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        if access.tls:
            port = server.add_secure_port(listen, server_credentials(access))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc} (is another mpsd running? use --listen)") from exc
    bound = f"{listen.rpartition(':')[0]}:{port}"
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    for model in models:
        await health_servicer.set(model.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("public API listening on %s (%s)", bound, describe(access))
    return server, bound


async def start_admin(admin_path: pathlib.Path, service: AdminService) -> grpc.aio.Server:
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(service, server)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        server.add_insecure_port(f"unix:{admin_path}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(admin_path, 0o600)
    log.info("admin API on %s (mode 0600)", admin_path)
    return server


async def start_http(listens: dict[str, str], daemon: DaemonConfig, service: InferenceService,
                     metrics: RequestMetrics, page: StatusPage) -> HttpServer | None:
    """The HTTP edge (routes.py: /v1, /metrics, the status page) on each address of `listens` ({key: HOST:PORT},
    "" for none), under the public port's rules: loopback unless TLS and a token are set, and then the same
    certificate and the same token. Every address is checked before any is bound."""
    bound = []
    for key, listen in listens.items():
        if not listen or any(listen == other and not listen.endswith(":0") for _, other, _, _ in bound):
            continue  # none, or an address set twice: bound once (port 0 twice asks for two free ports)
        try:
            bound.append((key, listen, *split_listen(listen)))
        except ValueError as exc:
            raise ListenError(f"{key}: {exc}") from None
        if problem := exposure_problem(listen, daemon.access, key):
            raise ListenError(problem)
    if not bound:
        return None
    routes = Routes(AccessRule.of(daemon.access), OpenAIApi(service, metrics), metrics.registry, page)
    server = HttpServer(routes.handle, error_body, daemon.http_limits)
    context = server_ssl_context(daemon.access) if daemon.access.tls else None
    scheme = "https" if context else "http"
    for key, listen, host, port in bound:
        try:
            port = await server.start(host, port, context)
        except OSError as exc:
            server.close()
            raise ListenError(f"cannot serve the HTTP edge on {listen}: {exc.strerror or exc} (is another mpsd "
                              f"running? use --{key.replace('_', '-')}, or {key} = \"\" to serve none)") from exc
        log.info("HTTP edge listening on %s://%s:%d (/v1, /metrics, status page /) (%s)", scheme, host, port,
                 describe(daemon.access))
        log.info("metrics on %s://%s:%d/metrics", scheme, host, port)
    page.start()  # samples its history until the loop ends
    return server
