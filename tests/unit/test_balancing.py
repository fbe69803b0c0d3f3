"""What a load balancer reads from mpsd, and the channel the Python client builds for several hosts."""

import json
import pathlib

import pytest
from grpc_health.v1 import health_pb2
from mpsd.balancing import channel_options, channel_target, service_config, split_addresses
from mpsd.supervisor.listeners import serving_status

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("ready, prospects, expected", [
    (1, None, SERVING),
    (2, "none is coming", SERVING),  # a READY worker serves whatever else happens to its model
    (0, None, SERVING),  # loading, restarting, or demand may start one: a request here will be served
    (0, "none is coming", NOT_SERVING),  # at max_replicas with none left, or stopping
    (0, "demo-0 gave up: boot failure", NOT_SERVING),
])
def test_a_model_is_serving_while_a_worker_is_ready_or_may_still_come(ready, prospects, expected):
    assert serving_status(ready, prospects) == expected


def test_the_shipped_service_config_is_the_one_the_client_uses():
    shipped = json.loads((ROOT / "clients" / "service-config.json").read_text())
    assert shipped == service_config("")
    policy = shipped["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and 2 <= policy["maxAttempts"] <= 5
    assert shipped["loadBalancingConfig"] == [{"round_robin": {}}]


def test_several_addresses_make_one_balanced_target():
    addresses = split_addresses("127.0.0.1:7700, 127.0.0.2:7700,")
    assert channel_target(addresses) == "ipv4:127.0.0.1:7700,127.0.0.2:7700"
    assert channel_target(["[::1]:7700", "[::2]:7701"]) == "ipv6:[::1]:7700,[::2]:7701"
    assert channel_target(["localhost:7700", "127.0.0.1:7701"]) == "ipv4:127.0.0.1:7700,127.0.0.1:7701"
    options = dict(channel_options(addresses, "demo"))
    assert json.loads(options["grpc.service_config"])["healthCheckConfig"] == {"serviceName": "demo"}
    assert "grpc.default_authority" not in options  # literal addresses: nothing to name for TLS


def test_one_address_is_left_alone_and_a_dns_name_gets_the_config():
    assert channel_target(["h1:7700"]) == "h1:7700" and channel_options(["h1:7700"]) == []
    assert channel_target(["dns:///mpsd.internal:7700"]) == "dns:///mpsd.internal:7700"
    assert "grpc.service_config" in dict(channel_options(["dns:///mpsd.internal:7700"]))


def test_targets_cannot_be_mixed_into_a_list():
    with pytest.raises(ValueError, match="HOST:PORT"):
        channel_target(["dns:///a:1", "b:2"])
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
