"""deploy/kubernetes/mpsd.yaml, checked by its keys (no cluster, no schema validator here): what docs/multi-host.md says."""

import pathlib

import pytest

from mpsd.config import DaemonConfig

yaml = pytest.importorskip("yaml")
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "mpsd.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(EXAMPLE.read_text())}


def test_the_pod_drains_within_its_grace_and_holds_one_gpu():
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    defaults = DaemonConfig()
    assert pod["terminationGracePeriodSeconds"] > defaults.drain_grace_s + defaults.stop_timeout_s
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["args"][:1] == ["serve"] and {"name": "grpc", "containerPort": 7700} in container["ports"]
    assert pod["volumes"][0]["secret"]["defaultMode"] == 0o400


def test_readiness_is_the_per_model_health_service_over_tls():
    container = documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]
    command = probe["exec"]["command"]
    assert command[0] == "grpc_health_probe" and "-tls" in command and "-addr=127.0.0.1:7700" in command
    assert any(arg.startswith("-service=") and arg != "-service=" for arg in command)
    assert probe["failureThreshold"] == 1 and probe["periodSeconds"] <= 5


def test_the_service_is_headless_for_client_side_balancing():
    service = documents()["Service"]["spec"]
    assert service["clusterIP"] == "None" and service["selector"] == {"app": "mpsd"}
    assert service["ports"] == [{"name": "grpc", "port": 7700, "targetPort": "grpc"}]
