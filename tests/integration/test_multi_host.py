"""Several mpsd hosts behind one gRPC channel (mpsd.balancing): spread, drain, kill -9, restart; all on loopback.

Three daemons on 127.0.0.1 with null-lm models (a worker is READY in well under
a second). Host a serves model "rare"; on b and c its worker cannot boot
(FATAL), so they report "rare" NOT_SERVING and client-side health checking
keeps its requests off them. Which host served a call is read from each
daemon's own request counters.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mpsd.client import Client
from hosts import LM, Load, free_port, run_one, served, start_host
from mpsd.v1 import inference_pb2
from support import ROOT, Daemon, wait_for

# Failover timing (a drain, a kill -9, nginx or the client re-routing) is measured against the clock: these
# run with the machine to themselves, after the parallel part of ./dev test.
pytestmark = pytest.mark.alone

RARE_SERVED = '\n[[models]]\nname = "rare"\nbackend = "null-lm"\nreplicas = 1\n'
ON_DEMAND = '\n[[models]]\nname = "lazy"\nbackend = "null-lm"\nmin_replicas = 0\nmax_replicas = 1\n'
RARE_BROKEN = '\n[[models]]\nname = "rare"\nbackend = "torch-lm"\npath = "{path}"\nreplicas = 1\nthreads = 1\n'


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Three hosts {name: Daemon}; a test may replace one (a restart), and whatever is left is closed."""
    root = tmp_path_factory.mktemp("hosts")
    broken = root / "no-model"
    broken.mkdir()
    started: dict[str, Daemon] = {}
    configs = {"a": LM + RARE_SERVED + ON_DEMAND, "b": LM + RARE_BROKEN.format(path=broken), "c": LM + RARE_BROKEN.format(path=broken)}
    try:
        for name, config in configs.items():
            started[name] = start_host(root / name, config, free_port())
        for name in "bc":
            wait_for(lambda: started[name].worker("rare-0")["state"] == "FATAL", 60, "rare FATAL")
        yield started
    finally:
        for daemon in list(started.values()):
            daemon.close()


def addresses(hosts: dict[str, Daemon]) -> list[str]:
    return [hosts[name].address for name in "abc"]


def test_calls_spread_over_every_host(hosts):
    before = {name: served(d, "lm") for name, d in hosts.items()}
    with Client(addresses(hosts), health_service="lm") as client:
        results = [run_one(client, "lm", 5) for _ in range(30)]
    assert all(error is None for _, error in results), results
    shares = {name: served(d, "lm") - before[name] for name, d in hosts.items()}
    print(f"30 calls, served per host: {shares}")
    assert sum(shares.values()) == 30 and all(share >= 5 for share in shares.values()), shares
    shown = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "generate", "x", "--model", "lm", "--max-tokens",
                            "3", "--address", ",".join(addresses(hosts))], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() and "3 generated tokens" in shown.stderr, shown.stderr


NODE_CALLS = """
const { connect, generate } = require('./mpsd-client');
(async () => {
  const client = connect(process.argv[1]);
  for (let i = 0; i < 12; i++) for await (const m of generate(client, { model: 'lm', prompt: 'x', max_tokens: 3 })) {}
  client.close();
})().catch((e) => { console.error(`${e.code}: ${e.details}`); process.exit(1); });
"""


def test_the_node_client_spreads_calls_over_several_addresses(hosts):
    node = shutil.which("node")
    if node is None or not (ROOT / "clients" / "node" / "node_modules").is_dir():
        pytest.skip("node or clients/node/node_modules is missing (./dev setup installs them)")
    before = {name: served(d, "lm") for name, d in hosts.items()}
    ran = subprocess.run([node, "-e", NODE_CALLS, ",".join(addresses(hosts))], cwd=ROOT / "clients" / "node",
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    shares = {name: served(d, "lm") - before[name] for name, d in hosts.items()}
    assert sum(shares.values()) == 12 and all(shares.values()), shares


def test_a_host_not_serving_a_model_gets_none_of_its_calls(hosts):
    before = {name: served(hosts[name], "rare") for name in "abc"}
    with Client(addresses(hosts), health_service="rare") as client:
        results = [run_one(client, "rare", 5) for _ in range(12)]
    assert all(error is None for _, error in results), results
    assert served(hosts["a"], "rare") - before["a"] == 12
    for name in "bc":  # not one call reached them, not even to be refused and retried
        assert sum(served(hosts[name], "rare", code) for code in ("OK", "UNAVAILABLE")) == 0
        assert health_of(hosts[name], "rare") == "NOT_SERVING" and health_of(hosts[name], "lm") == "SERVING"
    assert health_of(hosts["a"], "rare") == "SERVING"


def test_a_model_loaded_on_demand_is_serving_before_its_first_worker(hosts):
    """No worker yet, but a call would start one: a load balancer must send it, or the model never loads."""
    assert not [w for w in hosts["a"].status()["workers"] if w["model"] == "lazy"]
    assert health_of(hosts["a"], "lazy") == "SERVING"
    with Client(addresses(hosts), health_service="lazy") as client:
        assert run_one(client, "lazy", 5) == (5, None)


def health_of(daemon: Daemon, service: str) -> str:
    reply = health_pb2_grpc.HealthStub(daemon.channel()).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_drain_one_host_kill_another_and_restart_it(hosts, tmp_path):
    """SIGTERM on b, SIGKILL on c, under 8 concurrent streaming clients; then c comes back on its port."""
    before = {name: served(d, "lm") for name, d in hosts.items()}
    load = Load(Client(addresses(hosts), health_service="lm"), 8)
    started_at = time.monotonic()
    try:
        wait_for(lambda: load.count() >= 24, 30, "calls under way")
        shares = {name: served(d, "lm") - before[name] for name, d in hosts.items()}
        assert all(shares.values()), f"every host serves a share while all are up: {shares}"
        draining = hosts["b"]
        draining.process.send_signal(signal.SIGTERM)
        assert draining.process.wait(60) == 0
        mark = load.count()
        wait_for(lambda: load.count() >= mark + 24, 30, "calls after the drain")
        killed = hosts["c"]
        killed.process.kill()
        killed.process.wait(10)
        mark = load.count()
        wait_for(lambda: load.count() >= mark + 24, 30, "calls after the kill")
        hosts["c"] = start_host(tmp_path / "c-again", killed.config_path.read_text(), int(killed.address.rpartition(":")[2]))
        back = served(hosts["c"], "lm")
        restarted_at = time.monotonic()
        wait_for(lambda: served(hosts["c"], "lm") > back, 15, "traffic on the restarted host")
        print(f"the restarted host served again {time.monotonic() - restarted_at:.1f}s after it was READY")
        mark = load.count()
        wait_for(lambda: load.count() >= mark + 8, 30, "calls after the restart")
    finally:
        load.stop()
    print(f"load ran {time.monotonic() - started_at:.1f}s; shares before the drain: {shares}")
    failed = [(tokens, error) for tokens, error in load.results if error is not None]
    before_any_token = [(tokens, error) for tokens, error in failed if tokens == 0]
    print(f"{len(load.results)} calls: {len(load.results) - len(failed)} completed, {len(failed)} cut mid-stream "
          f"({', '.join(sorted({e.code.name for _, e in failed})) or 'none'}), {len(before_any_token)} failed before a token")
    assert not before_any_token, before_any_token[:3]
    assert all(error.code == grpc.StatusCode.UNAVAILABLE for _, error in failed), failed[:3]


def test_a_draining_host_reports_not_serving_before_its_port_closes(hosts):
    """Order of events on one host: NOT_SERVING on its Watch streams, then its port closes (a stream holds it open)."""
    host = hosts["a"]
    watches = {name: health_pb2_grpc.HealthStub(host.channel()).Watch(health_pb2.HealthCheckRequest(service=name),
                                                                        timeout=60) for name in ("", "lm")}
    for watch in watches.values():
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    holding = host.inference().Generate(inference_pb2.GenerateRequest(model="lm", prompt="x", max_tokens=1 << 20), timeout=60)
    next(holding)
    host.process.send_signal(signal.SIGTERM)
    for watch in watches.values():
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    # The port still answers: a new call is refused with UNAVAILABLE and a sentence, not a closed connection.
    with pytest.raises(grpc.RpcError) as refused:
        list(host.inference().Generate(inference_pb2.GenerateRequest(model="lm", prompt="x", max_tokens=1), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
    holding.cancel()
    assert host.process.wait(60) == 0
