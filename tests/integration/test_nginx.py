"""deploy/nginx/mpsd.conf in front of three real mpsd hosts: spread, a drain, a kill -9, the HTTP API's SSE.

nginx comes from the system packages (`.ci/run` installs nginx-light as root);
elsewhere the module skips and says how to get it. The shipped file is used as
it is, with only its upstream servers and listen ports swapped for the test's.
Clients carry the retry policy (Client(..., retry=True)): nginx cannot see a
gRPC UNAVAILABLE (an HTTP 200), the client resends it and nginx's round robin
picks another host. The figures are printed as they are.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import urllib.request

import pytest

from hosts import LM, Load, free_port, run_one, served, start_host
from mpsd.client import Client
from support import ROOT, Daemon, wait_for

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if pathlib.Path(p).exists()), None)
# Failover timing (a drain, a kill -9, nginx re-routing) is measured against the clock: `alone` runs these with
# the machine to themselves, after the parallel part of ./dev test.
pytestmark = [pytest.mark.alone,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light; .ci/run "
                                                       "installs it when run as root)")]
SHIPPED = ROOT / "deploy" / "nginx" / "mpsd.conf"
MAIN = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    include {dir}/mpsd.conf;
}}
"""


def configured(hosts: list[Daemon], grpc_port: int, http_port: int) -> str:
    """The shipped file with the test's hosts in its upstreams and the test's ports in its listen lines."""
    text = SHIPPED.read_text()
    def upstream(name: str, addresses: list[str]) -> None:
        nonlocal text
        block = re.search(r"upstream %s \{.*?\n\}" % name, text, re.S).group(0)
        options = re.search(r"server \S+ ([^;]*);", block).group(1)
        lines = "".join(f"    server {address} {options};\n" for address in addresses)
        text = text.replace(block, re.sub(r"(    server [^\n]*\n)+", lambda _: lines, block, count=1))
    upstream("mpsd_grpc", [h.address for h in hosts])
    upstream("mpsd_http", [h.http_url.split("//")[1].removesuffix("/v1") for h in hosts])
    text = text.replace("listen 7700 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
    return text.replace("listen 7702;", f"listen 127.0.0.1:{http_port};")


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """Three hosts behind nginx: ({name: Daemon}, nginx's gRPC address, nginx's HTTP base URL)."""
    root = tmp_path_factory.mktemp("nginx")
    hosts: dict[str, Daemon] = {}
    nginx = None
    try:
        for name in "abc":
            hosts[name] = start_host(root / name, LM, free_port(), http_listen="127.0.0.1:0")
        grpc_port, http_port = free_port(), free_port()
        folder = root / "nginx"
        folder.mkdir()
        (folder / "mpsd.conf").write_text(configured(list(hosts.values()), grpc_port, http_port))
        (folder / "nginx.conf").write_text(MAIN.format(dir=folder))
        checked = subprocess.run([NGINX, "-t", "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                 capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        nginx = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _answers(grpc_port), 20, "nginx listening")
        yield hosts, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/v1"
    finally:
        if nginx:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(20)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(10)
        for daemon in hosts.values():
            daemon.close()


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_calls_through_nginx_spread_over_every_host(farm):
    hosts, address, _ = farm
    before = {name: served(d, "lm") for name, d in hosts.items()}
    with Client(address, retry=True) as client:
        results = [run_one(client, "lm", 5) for _ in range(30)]
    assert all(error is None for _, error in results), results
    shares = {name: served(d, "lm") - before[name] for name, d in hosts.items()}
    print(f"30 calls through nginx, served per host: {shares}")
    assert all(shares.values()), shares


def test_the_http_api_streams_through_nginx(farm):
    _, _, base_url = farm
    body = json.dumps({"model": "lm", "prompt": "x", "max_tokens": 5, "stream": True}).encode()
    request = urllib.request.Request(f"{base_url}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 6, events


def test_a_drain_and_a_kill_behind_nginx_lose_no_call_without_a_token(farm):
    """b drains (SIGTERM), then c is killed (SIGKILL), under 8 streaming clients with the retry policy; a still serves."""
    hosts, address, _ = farm
    load = Load(Client(address, retry=True), 8)
    try:
        wait_for(lambda: load.count() >= 24, 30, "calls under way")
        hosts["b"].process.send_signal(signal.SIGTERM)
        assert hosts["b"].process.wait(60) == 0
        mark = load.count()
        wait_for(lambda: load.count() >= mark + 24, 30, "calls after the drain")
        hosts["c"].process.kill()
        hosts["c"].process.wait(10)
        mark = load.count()
        wait_for(lambda: load.count() >= mark + 24, 30, "calls after the kill")
    finally:
        load.stop()
    failed = [(tokens, error) for tokens, error in load.results if error is not None]
    before_any_token = [(tokens, error) for tokens, error in failed if tokens == 0]
    codes = sorted({f"{error.code.name}: {error.details}" for _, error in failed})
    print(f"through nginx, {len(load.results)} calls: {len(load.results) - len(failed)} completed, {len(failed)} cut "
          f"mid-stream, {len(before_any_token)} failed before a token; ended with: {codes or 'none'}")
    assert not before_any_token, before_any_token[:3]
