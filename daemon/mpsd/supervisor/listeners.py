"""Binding the edge: the public gRPC server (with health and reflection), the admin socket, the HTTP listeners.

Each function takes the parts it serves and the access settings, binds, and
returns the running server; a port that cannot be bound becomes a
ListenError worded for the operator. The daemon decides when they start and
stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mpsd.config import ModelConfig, PublicAccess, split_listen
from mpsd.supervisor.edge.access import (
    BearerTokenInterceptor,
    describe,
    exposure_problem,
    is_loopback,
    read_token,
    server_credentials,
    server_ssl_context,
)
from mpsd.supervisor.edge.admin import AdminService
from mpsd.supervisor.edge.http.metrics_http import start_metrics_server, url_of
from mpsd.supervisor.edge.http.openai import MAX_BODY_BYTES, OpenAIApi, error_body
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
    interceptors = [BearerTokenInterceptor(read_token(access.token_file))] if access.token_file else []
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


async def start_metrics(metrics_listen: str, metrics: RequestMetrics, page: StatusPage) -> asyncio.Server | None:
    """Prometheus /metrics on plain HTTP; loopback by default, anywhere the operator says, with a warning.

    The figures carry no secrets and change nothing, but they name models
    and workers and show traffic; a scraper on another machine is the
    usual set-up, so another address is allowed, not refused.
    """
    if not metrics_listen:
        return None
    try:
        host, port = split_listen(metrics_listen)
    except ValueError as exc:
        raise ListenError(f"metrics listen: {exc}") from None
    if not is_loopback(host):
        log.warning("metrics on %s are readable by anyone who can reach that address (plain HTTP, no token)",
                    metrics_listen)
        log.warning("status page not served on %s: beyond loopback it would need TLS and a token, which the "
                    "metrics listener has not; serve metrics on loopback to see it", metrics_listen)
        page = None
    try:
        server = await start_metrics_server(host, port, metrics.registry, page)
    except OSError as exc:
        raise ListenError(f"cannot serve metrics on {metrics_listen}: {exc.strerror or exc} "
                          f"(is another mpsd running? use --metrics-listen, or metrics_listen = \"\" to serve none)") from exc
    log.info("metrics on %s", url_of(server, host))
    if page:
        page.start()  # samples its history until the loop ends
        log.info("status page on %s", url_of(server, host).removesuffix("metrics"))
    return server


async def start_http(http_listen: str, access: PublicAccess, service: InferenceService,
                     metrics: RequestMetrics) -> HttpServer | None:
    """The OpenAI-compatible API (openai.py) on its own port, under the public port's rules: loopback
    unless TLS and a token are set, and then the same certificate and the same token."""
    if not http_listen:
        return None
    try:
        host, port = split_listen(http_listen)
    except ValueError as exc:
        raise ListenError(f"http listen: {exc}") from None
    if problem := exposure_problem(http_listen, access, "http_listen"):
        raise ListenError(problem)
    api = OpenAIApi(service, metrics, read_token(access.token_file) if access.token_file else None)
    server = HttpServer(api.handle, error_body, MAX_BODY_BYTES)
    try:
        port = await server.start(host, port, server_ssl_context(access) if access.tls else None)
    except OSError as exc:
        raise ListenError(f"cannot serve the HTTP API on {http_listen}: {exc.strerror or exc} (is another "
                          f"mpsd running? use --http-listen, or http_listen = \"\" to serve none)") from exc
    scheme = "https" if access.tls else "http"
    log.info("OpenAI-compatible HTTP API listening on %s://%s:%d/v1 (%s)", scheme, host, port, describe(access))
    return server
