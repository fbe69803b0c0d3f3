"""Several mpsd hosts behind one gRPC channel, by gRPC's own means: no cluster layer of mpsd's.

The channel resolves to every host, `round_robin` spreads calls over those
whose `grpc.health.v1` status for `health_service` is SERVING (client-side
health checking: each host reports NOT_SERVING for a model it cannot serve,
and for everything from the first moment of a drain), and a retry policy
resends a call that ended UNAVAILABLE before any response reached the client.
mpsd refuses only that way before its first token (draining, no worker), so
the retry is safe; a stream cut after its first token is never retried: gRPC
commits a call once response headers arrive, and the caller sees UNAVAILABLE.

clients/service-config.json is `service_config("")` written out (a unit test
keeps the two equal), for clients in other languages.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Sequence

INFERENCE_SERVICE = "mpsd.v1.Inference"
# gRPC caps maxAttempts at 5; 3 tries three hosts, and gives up in about 0.3 s plus the calls themselves.
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# gRPC's default grows to 120 s between tries to reach a host that went down; a restarted host should get traffic
# again within seconds.
MAX_RECONNECT_BACKOFF_MS = 5000


def service_config(health_service: str | None = "") -> dict:
    """round_robin over the hosts SERVING `health_service` (a model name, or "" for the whole daemon), with
    UNAVAILABLE retried on another host; None: the retry policy alone (one address: a proxy in front of hosts)."""
    retry = {"methodConfig": [{"name": [{"service": INFERENCE_SERVICE}], "retryPolicy": RETRY_POLICY}]}
    if health_service is None:
        return retry
    return {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": health_service}, **retry}


def split_addresses(address: str | Sequence[str]) -> list[str]:
    """"h1:7700,h2:7700" or a list of such, as a list of HOST:PORT (or one gRPC target such as dns:///name:7700)."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    return [part.strip() for part in parts if part.strip()]


def channel_target(addresses: Sequence[str]) -> str:
    """One gRPC target for the hosts: an ipv4:/ipv6: list of literal addresses, names resolved once here.

    A name that stands for a changing set of hosts belongs in DNS (several
    records under one name) and is given as one target, dns:///name:port:
    gRPC re-resolves it itself.
    """
    if len(addresses) == 1:
        return addresses[0]
    if any("://" in a or a.startswith(("dns:", "unix:", "ipv4:", "ipv6:")) for a in addresses):
        raise ValueError(f"several addresses must each be HOST:PORT, not a gRPC target: {', '.join(addresses)}")
    v4: list[str] = []
    v6: list[str] = []
    for address in addresses:
        host, port = _host_port(address)
        for ip in _resolve(host, port):
            (v6 if ip.version == 6 else v4).append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if v4 and v6:
        raise ValueError("several addresses must be all IPv4 or all IPv6 (gRPC takes one list of one family)")
    return f"ipv6:{','.join(dict.fromkeys(v6))}" if v6 else f"ipv4:{','.join(dict.fromkeys(v4))}"


def channel_options(addresses: Sequence[str], health_service: str = "", retry: bool = False) -> list[tuple[str, object]]:
    """The service config for several hosts (or a dns:/// name, which may stand for several); for one host, the retry
    policy alone when `retry` (a proxy that spreads the calls), else nothing."""
    if len(addresses) == 1 and not addresses[0].startswith("dns:"):
        return [("grpc.service_config", json.dumps(service_config(None)))] if retry else []
    options: list[tuple[str, object]] = [("grpc.service_config", json.dumps(service_config(health_service))),
                                         ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
    host = _host_port(addresses[0])[0] if len(addresses) > 1 else ""
    if host and not _is_literal(host):
        options.append(("grpc.default_authority", host))  # TLS checks the certificate against the first name given
    return options


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if _is_literal(host):
        return [ipaddress.ip_address(host)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos if info[0] == socket.AF_INET)) or \
        list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
