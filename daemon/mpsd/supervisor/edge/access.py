"""Who may call mpsd, on gRPC and HTTP alike: loopback by default; anywhere else only with TLS and a bearer token.

One rule for both protocols, so that an operator who secured one port has
secured them all. The policy (`exposure_problem`, `read_token`) is pure and
tested without a server; `AccessRule` is the one check of a presented token:
`BearerTokenInterceptor` applies it to every gRPC call, the HTTP edge's route
table (http/routes.py) to every HTTP route. The token is compared in constant
time (hmac.compare_digest over SHA-256 digests, so not even its length leaks).
Open without it, because they hold no data: gRPC health checks (a load
balancer probes without the secret and learns only SERVING or NOT_SERVING)
and the status page's static shell (the browser must load it to ask for the
token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import pathlib
import ssl
import stat

import grpc

from mpsd.config import PublicAccess

MIN_TOKEN_CHARS = 16
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class AccessError(ValueError):
    """A listen/TLS/token setting that cannot be served safely; worded for the operator."""


def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and 'localhost'; any other name might resolve anywhere."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(listen: str, access: PublicAccess, key: str = "listen") -> str:
    """Why this listen address (the setting `key`) may not be served with these settings; '' when it may."""
    host = listen.rpartition(":")[0]
    if is_loopback(host):
        return ""
    missing = [name for name, value in (("tls_cert and tls_key", access.tls), ("token_file", access.token_file)) if not value]
    if not missing:
        return ""
    problem = (f"{key} {listen!r} is not loopback: other machines could call the API, so [daemon] "
               f"{' and '.join(missing)} must be set (TLS and a bearer token), or listen on 127.0.0.1")
    if key == "metrics_listen":  # it used to serve plain HTTP to anyone: say why a set-up that worked now stops
        problem += ("; /metrics is now served by the HTTP edge under the API's rule, so a scraper beyond loopback "
                    "needs TLS and the token as well (Prometheus: scheme: https and authorization: {credentials_file: "
                    "TOKEN_FILE}), or set metrics_listen = \"\" and scrape http_listen on loopback")
    return problem


def read_token(path: pathlib.Path) -> bytes:
    """The bearer token from a file only its owner can read, like ssh insists for keys."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AccessError(f"token_file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AccessError(f"token_file {path} is open to other users (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise AccessError(f"token_file {path}: the token must be one word of at least {MIN_TOKEN_CHARS} characters "
                          f"(e.g. from `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return text.encode()


def server_credentials(access: PublicAccess) -> grpc.ServerCredentials:
    try:
        key, cert = access.tls_key.read_bytes(), access.tls_cert.read_bytes()
    except OSError as exc:
        raise AccessError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def server_ssl_context(access: PublicAccess) -> ssl.SSLContext:
    """The same certificate and key for the HTTP API as server_credentials gives the gRPC port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(access.tls_cert, access.tls_key)
    except ssl.SSLError as exc:  # before OSError, which it is
        raise AccessError(f"TLS: cannot use {access.tls_cert} and {access.tls_key}: {exc}") from None
    except OSError as exc:
        raise AccessError(f"TLS: cannot read {exc.filename or access.tls_cert}: {exc.strerror or exc}") from None
    return context


def token_matches(presented: str, expected: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(expected).digest())


def bearer_of(metadata) -> str:
    """The token in 'authorization: Bearer TOKEN' (gRPC metadata, or HTTP headers as pairs); '' when absent or
    another scheme."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


@dataclasses.dataclass(frozen=True)
class AccessRule:
    """Whether a caller may be served: always when no token is configured (loopback, as exposure_problem
    insists), else only with 'authorization: Bearer TOKEN'."""

    token: bytes | None = None

    @classmethod
    def of(cls, access: PublicAccess) -> AccessRule:
        return cls(read_token(access.token_file) if access.token_file else None)

    def admits(self, metadata) -> bool:
        """`metadata`: (name, value) pairs, names lower-cased, as gRPC metadata and HTTP headers both come."""
        return self.token is None or token_matches(bearer_of(metadata), self.token)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless the rule admits it: UNAUTHENTICATED."""

    def __init__(self, rule: AccessRule) -> None:
        self._rule = rule

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self._rule.admits(details.invocation_metadata):
            return handler
        return _refusal_like(handler)


async def _refuse(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "a bearer token is required: send metadata 'authorization: Bearer TOKEN'")


def _refusal_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the refused one, so the call ends cleanly with the status."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def describe(access: PublicAccess) -> str:
    parts = ["TLS" if access.tls else "plaintext", "bearer token required" if access.token_file else "no token"]
    return ", ".join(parts)

