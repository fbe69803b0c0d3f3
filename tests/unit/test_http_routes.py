"""The HTTP edge's route table on a real HttpServer on 127.0.0.1: /v1, /metrics and the status page on one listener,
the methods each takes, the token on every route but the page's static shell, and the scrape format from Accept."""

import asyncio
import json

import pytest
from mpsd.config import HttpLimits
from mpsd.supervisor.edge.access import AccessRule
from mpsd.supervisor.edge.http.openai import OpenAIApi, error_body
from mpsd.supervisor.edge.http.routes import Routes
from mpsd.supervisor.edge.http.server import HttpServer
from mpsd.supervisor.edge.http.status_page import StatusPage
from mpsd.supervisor.edge.inference import InferenceService
from mpsd.supervisor.edge.metrics import RequestMetrics
from mpsd.v1 import admin_pb2

TOKEN = "a-token-of-enough-characters-0123"
# What Prometheus itself asks for: OpenMetrics first, the classic text format as a fallback.
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


async def status() -> admin_pb2.StatusResponse:
    return admin_pb2.StatusResponse(daemon=admin_pb2.DaemonStatus(version="test"))


def ask(token: bytes | None, requests: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Each request ("METHOD PATH" and extra header lines) on its own connection: (status, headers, body)."""
    async def scenario():
        metrics = RequestMetrics()
        api = OpenAIApi(InferenceService({}, lambda name: True, metrics=metrics), metrics)
        routes = Routes(AccessRule(token), api, metrics.registry, StatusPage(None, {}, metrics, status))
        server = HttpServer(routes.handle, error_body, HttpLimits())
        port = await server.start("127.0.0.1", 0)
        answers = []
        try:
            for request in requests:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                line, *headers = request.split("\n")
                extra = "".join(f"{header}\r\n" for header in headers)
                writer.write(f"{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
                answers.append(_parse(await asyncio.wait_for(reader.read(), 10)))
                writer.close()
        finally:
            server.close()
        return answers
    return asyncio.run(scenario())


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


DATA_ROUTES = ["GET /metrics", "GET /api/status", "GET /api/history", "GET /v1/models"]
SHELL = ["GET /", "GET /index.html", "GET /status.js", "GET /status.css"]


def test_without_a_token_configured_every_route_answers_on_one_listener():
    answers = ask(None, DATA_ROUTES + SHELL)
    assert [status for status, _, _ in answers] == [200] * 8
    metrics, api_status, history, models, page = answers[:5]
    assert metrics[1]["content-type"].startswith("text/plain; version=0.0.4") and b"mpsd_requests_total" in metrics[2]
    assert json.loads(api_status[2])["daemon"]["version"] == "test"
    assert set(json.loads(history[2])) == {"period_s", "span_s", "samples", "transitions"}
    assert json.loads(models[2]) == {"object": "list", "data": []}
    assert b"mpsd status" in page[2] and page[1]["cache-control"] == "no-store"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-of-some-length", f"Basic {TOKEN}", "Bearer"],
                         ids=["none", "wrong", "other-scheme", "empty"])
def test_with_a_token_every_data_route_refuses_a_request_without_it(authorization):
    extra = f"\nAuthorization: {authorization}" if authorization else ""
    for status, headers, body in ask(TOKEN.encode(), [route + extra for route in DATA_ROUTES]):
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        refusal = json.loads(body)["error"]
        assert refusal["code"] == "invalid_api_key" and "bearer token" in refusal["message"]


def test_with_a_token_it_opens_every_route_and_the_page_shell_needs_none():
    with_token = ask(TOKEN.encode(), [route + f"\nAuthorization: Bearer {TOKEN}" for route in DATA_ROUTES] + SHELL)
    assert [status for status, _, _ in with_token] == [200] * 8
    assert b"fetch" in with_token[6][2], "status.js, served to a browser that has no token yet"


def test_methods_paths_and_head():
    not_found, wrong_method, head, model = ask(None, ["GET /nothing-here", "POST /metrics", "HEAD /metrics",
                                                      "GET /v1/models/nope"])
    assert not_found[0] == 404 and json.loads(not_found[2])["error"]["code"] == "unknown_url"
    served = json.loads(not_found[2])["error"]["message"]
    assert all(part in served for part in ("GET /v1/models", "POST /v1/chat/completions", "GET /metrics",
                                           "GET /api/status", "the status page at /"))
    assert wrong_method[0] == 405 and wrong_method[1]["allow"] == "GET, HEAD"
    assert json.loads(wrong_method[2])["error"]["message"] == "/metrics takes GET or HEAD, not POST"
    assert head[0] == 200 and head[2] == b"" and int(head[1]["content-length"]) > 0
    assert model[0] == 404 and json.loads(model[2])["error"]["code"] == "model_not_found"


def test_the_scrape_format_follows_accept():
    classic, negotiated = ask(None, ["GET /metrics?x=1", f"GET /metrics\nAccept: {OPENMETRICS}"])
    assert classic[0] == 200 and classic[1]["content-type"].startswith("text/plain; version=0.0.4")
    assert negotiated[1]["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert negotiated[2].endswith(b"# EOF\n")
