"""The status page in a real browser: the system's headless Chromium, driven by Selenium, against a real daemon.

The fleet: two demo workers that fit a file-probe budget and one worker of a
bigger model that does not, so the page must draw two live footprints and one
that does not fit. No browser is downloaded: without /usr/bin/chromium and
/usr/bin/chromedriver (apt: chromium chromium-driver; .ci/run installs them
when it runs as root) the browser test skips and says so.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from support import DEMO_ONE_WORKER, ROOT, running_daemon, wait_for, write_probe

# Where each run leaves its screenshot (ignored by git); docs/status-page.png is a copy of one, taken by hand.
SCREENSHOT = ROOT / ".cache" / "status-page.png"
GiB = 1024**3
CONFIG = f"""
[daemon]
restart_delay = "2s"
restart_max_delay = "2s"
health_interval = "0.5s"

[memory]
probe = "file:{{probe}}"
{DEMO_ONE_WORKER.replace("replicas = 1", "replicas = 2")}footprint = "1GiB"

[[models]]
name = "big"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
replicas = 1
threads = 1
footprint = "2GiB"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    folder = tmp_path_factory.mktemp("status-page")
    probe = folder / "memory.json"
    write_probe(probe, budget=int(2.5 * GiB))
    with running_daemon(folder / "d", CONFIG.format(probe=probe), ready=2) as daemon:
        wait_for(lambda: _states(daemon.status()) == ["READY", "READY", "REFUSED"], 60, "2 READY, 1 REFUSED")
        daemon.page_url = daemon.metrics_url.removesuffix("metrics")
        yield daemon


def _states(status):
    return sorted(w["state"] for w in status["workers"])


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


# The page redraws every second, so an element found now may be gone a moment later: each look at the DOM is
# one script, run between two redraws, returning plain data.
READ_PAGE = """
const pick = (selector, f) => Array.from(document.querySelectorAll(selector), f);
return {
  rows: pick("#workers tbody tr", r => ({id: r.dataset.worker, state: r.dataset.state, text: r.innerText})),
  segments: pick("#memory-bar .seg", s => ({cls: s.className, worker: s.dataset.worker || "", title: s.title})),
  lines: pick("#charts polyline", l => ({chart: l.closest(".chart").id, series: l.dataset.series,
                                         points: Number(l.dataset.points), max: Number(l.dataset.max)})),
  transitions: document.getElementById("transitions").textContent,
};
"""


def _page(browser) -> dict:
    return browser.execute_script(READ_PAGE)


def _page_rows(browser) -> dict[str, str]:
    return {row["id"]: row["state"] for row in _page(browser)["rows"]}


def _line(browser, chart: str = "chart-demo-tokens") -> dict:
    return next((l for l in _page(browser)["lines"] if l["chart"] == chart), {"points": 0, "max": 0})


def test_the_page_draws_the_fleet_follows_a_kill_and_charts_requests(daemon, browser):
    browser.get(daemon.page_url)
    wait_for(lambda: sorted(_page_rows(browser).values()) == ["READY", "READY", "REFUSED"], 15, "the table")
    page = _page(browser)
    refused = [row for row in page["rows"] if row["state"] == "REFUSED"]
    assert refused[0]["id"] == "big-0"
    assert "needs 2.0GiB, 512.0MiB free of 2.5GiB budget" in refused[0]["text"]
    live = [s["worker"] for s in page["segments"] if "live" in s["cls"]]
    nofit = [s for s in page["segments"] if "nofit" in s["cls"]]
    assert sorted(live) == ["demo-0", "demo-1"]
    assert [s["worker"] for s in nofit] == ["big-0"] and "needs 2.0GiB" in nofit[0]["title"]

    for _ in range(4):
        daemon.generate("The module", max_tokens=24)
    wait_for(lambda: _line(browser)["max"] > 0, 10, "tokens/s on the chart")
    assert _line(browser)["points"] >= 2
    wait_for(lambda: _line(browser, "chart-demo-ttft")["max"] > 0, 10, "a time to first token on the chart")

    os.kill(daemon.worker("demo-0")["pid"], signal.SIGKILL)
    wait_for(lambda: _page_rows(browser).get("demo-0") == "BACKOFF", 10, "BACKOFF on the page")
    wait_for(lambda: _page_rows(browser).get("demo-0") == "READY", 90, "READY again on the page")
    page = _page(browser)
    assert sorted(row["state"] for row in page["rows"]) == ["READY", "READY", "REFUSED"]
    assert "worker demo-0" in page["transitions"] and "READY -> BACKOFF" in page["transitions"]
    for _ in range(3):
        daemon.generate("The module", max_tokens=24)
    wait_for(lambda: _line(browser)["max"] > 0, 10, "tokens/s again")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    assert browser.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(13, 17, 23)"


def test_api_status_is_what_mpsctl_status_json_prints(daemon):
    printed = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir),
                              "status", "--json"], capture_output=True, text=True, timeout=60, check=True)
    cli, api = json.loads(printed.stdout), _get(daemon.page_url + "api/status")
    assert api.keys() == cli.keys()
    for part in ("daemon", "memory"):
        assert api[part].keys() == cli[part].keys()
    assert api["daemon"]["pid"] == cli["daemon"]["pid"] and api["daemon"]["listen"] == cli["daemon"]["listen"]
    assert api["memory"]["budget_bytes"] == cli["memory"]["budget_bytes"]
    assert [(m.keys(), m["name"], m["footprint_bytes"]) for m in api["models"]] == \
        [(m.keys(), m["name"], m["footprint_bytes"]) for m in cli["models"]]
    stable = ("id", "model", "pid", "state", "restarts")
    assert [(w.keys(), [w[k] for k in stable]) for w in api["workers"]] == \
        [(w.keys(), [w[k] for k in stable]) for w in cli["workers"]]


READ_CACHE = """
return Array.from(document.querySelectorAll("#workers tbody tr"), r => ({
  id: r.dataset.worker, cache: r.querySelector("td.cache").textContent, hits: r.querySelector("td.hits").textContent,
  reason: r.querySelector("td.reason").textContent}));
"""


def test_the_page_shows_each_workers_prefix_cache_as_status_reports_it(daemon, browser):
    from mpsd.units import format_bytes

    for _ in range(3):  # three alike on two workers: one of them serves two, and the second reuses the first
        daemon.generate("The module provides", max_tokens=8, temperature=0)
    browser.get(daemon.page_url)

    def agree():
        workers = {w["id"]: w for w in _get(daemon.page_url + "api/status")["workers"]}
        rows = {row["id"]: row for row in browser.execute_script(READ_CACHE)}
        if rows.keys() != workers.keys():
            return None
        for worker_id, worker in workers.items():
            cache, row = worker["prefix_cache"], rows[worker_id]
            if not cache["configured_bytes"] and not cache["budget_bytes"]:
                expected = ("-", "-")
            else:
                seen = cache["hit_tokens"] + cache["miss_tokens"]
                expected = (f"{format_bytes(cache['bytes'])}/{format_bytes(cache['budget_bytes'])}",
                            f"{math.floor(100 * cache['hit_tokens'] / seen + 0.5)}%" if seen else "-")  # Math.round
            if (row["cache"], row["hits"]) != expected or worker["prefix_cache_note"] not in row["reason"]:
                return None
        return rows
    rows = wait_for(agree, 15, "the page's cache cells to show what /api/status says")
    assert rows["big-0"]["cache"] == "-", "a torch-module keeps no prefix cache"
    assert all("/" in rows[w]["cache"] for w in ("demo-0", "demo-1")), "torch-lm keeps one by default"


def test_history_holds_samples_and_transitions(daemon):
    history = _get(daemon.page_url + "api/history")
    assert history["period_s"] == 1.0 and history["span_s"] == 900
    assert len(history["samples"]) >= 2
    last = history["samples"][-1]
    assert set(last["models"]) == {"demo", "big"} and last["memory"]["budget_bytes"] == int(2.5 * GiB)
    assert any("big-0" in line and "REFUSED" in line for line in history["transitions"])


def _raw(daemon, data: bytes) -> bytes:
    host, _, port = daemon.page_url.split("//")[1].rstrip("/").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(data)
        return connection.makefile("rb").readline()


def test_one_listener_serves_the_page_the_metrics_and_the_api(daemon):
    assert daemon.page_url.removesuffix("/") == daemon.http_url.removesuffix("/v1")
    assert "HTTP edge listening on " + daemon.page_url.removesuffix("/") + " (/v1, /metrics, status page /)" in daemon.log()
    assert [m["id"] for m in _get(daemon.http_url + "/models")["data"]] == ["demo"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
    (b"POST /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b"405"),
    (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
    (b"GET /api/history?" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"y" * 70_000 + b"\r\n\r\n", b"431"),  # the head's cap: 64 KiB
])
def test_bad_requests_are_answered_and_the_page_keeps_serving(daemon, request_bytes, status):
    assert _raw(daemon, request_bytes).split()[1] == status
    with urllib.request.urlopen(daemon.page_url, timeout=10) as response:
        assert response.status == 200 and b"mpsd status" in response.read()
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(daemon.page_url + "api/status", method="PUT"), timeout=10)
    assert error.value.code == 405


TOKEN = "status-page-token-0123456789abcdef"


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory):
    """A daemon on loopback with a token: every route but the page's shell asks for it."""
    folder = tmp_path_factory.mktemp("status-token")
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = f'[daemon]\ntoken_file = "{token}"\n[[models]]\nname = "n"\nbackend = "null-lm"\n'
    with running_daemon(folder / "d", config, ready=1) as daemon:
        daemon.page_url = daemon.metrics_url.removesuffix("metrics")
        yield daemon


def _status_code(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_with_a_token_the_data_needs_it_and_the_shell_does_not(token_daemon):
    for url in (token_daemon.metrics_url, token_daemon.page_url + "api/status", token_daemon.page_url + "api/history",
                token_daemon.http_url + "/models"):
        answers = (_status_code(url), _status_code(url, "not-the-token-at-all"), _status_code(url, TOKEN))
        assert answers == (401, 401, 200), url
    for path in ("", "index.html", "status.js", "status.css"):
        assert _status_code(token_daemon.page_url + path) == 200


READ_LOGIN = """
const form = document.getElementById("login");
return {shown: !form.hidden, why: document.getElementById("login-why").textContent,
        rows: Array.from(document.querySelectorAll("#workers tbody tr"), r => r.dataset.worker),
        session: sessionStorage.getItem("mpsd-token"), local: localStorage.length, url: location.href};
"""


def test_the_page_asks_for_the_token_keeps_it_for_the_tab_and_asks_again_when_it_is_wrong(token_daemon, browser):
    from selenium.webdriver.common.by import By

    def login() -> dict:
        return browser.execute_script(READ_LOGIN)

    def enter(token: str) -> None:
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()

    browser.get(token_daemon.page_url)
    asked = wait_for(lambda: (page := login())["shown"] and page, 15, "the token prompt")
    assert "requires its bearer token" in asked["why"] and asked["rows"] == []
    assert browser.find_element(By.ID, "token").get_attribute("type") == "password"
    enter("not-the-token-at-all")
    again = wait_for(lambda: (page := login())["shown"] and "not accepted" in page["why"] and page, 15,
                     "the prompt again, saying the token was refused")
    assert again["session"] is None, "a refused token is not kept"
    enter(TOKEN)
    shown = wait_for(lambda: (page := login())["rows"] == ["n-0"] and page, 15, "the workers table")
    assert not shown["shown"] and shown["session"] == TOKEN and shown["local"] == 0
    assert TOKEN not in shown["url"] and shown["url"] == token_daemon.page_url
