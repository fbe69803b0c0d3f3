"""The prefix cache of a real daemon, seen from outside: reuse is reported, changes no answer, and routing follows it.

One daemon for the module: the demo model "demo" with two workers and a
cache, and the same model as "nocache" (prefix_cache = "0", one worker): what
the same request answers without the cache. Turn 2 of a conversation starts
with turn 1's prompt and answer, which the worker that served turn 1 keeps.
"demo" routes by prefix, so turn 2 goes back to that worker (the conversation
test checks it); the other tests do not lean on routing: `until_hit` sends a
request up to three times, since two misses can only be one per worker and
each leaves its prompt behind, so the third finds it. Every send, hit or
miss, must answer what "nocache" answers.
"""

import json
import subprocess
import sys
import urllib.request

import openai
import pytest
from mpsd.cli.status_format import format_status
from mpsd.units import format_bytes
from mpsd.v1 import inference_pb2
from support import metric, running_daemon, wait_for

CONFIG = """
[daemon]
health_interval = "0.5s"

[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = 2
threads = 1
prefix_cache = "8MiB"

[[models]]
name = "nocache"
backend = "torch-lm"
path = "@demo"
replicas = 1
threads = 1
prefix_cache = "0"
"""
SYSTEM = {"role": "system", "content": "You answer questions about the module and what it provides to its users."}
TURN_1 = [SYSTEM, {"role": "user", "content": "What does the module provide?"}]
FOLLOW_UP = {"role": "user", "content": "And what does it need?"}
PROMPT = "The module provides a way to read the data and the functions that"
SENDS = 3  # enough for a hit on one of two workers whatever the routing (see the module's docstring)


@pytest.fixture(scope="module")
def daemon(demo_model, tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("prefix-cache"), CONFIG, 3) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=daemon.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def post(daemon, path: str, body: dict) -> dict:
    """The official API's JSON over plain HTTP: no SDK between the answer and the test."""
    request = urllib.request.Request(daemon.http_url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def cached(usage) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"] if isinstance(usage, dict) else \
        usage.prompt_tokens_details.cached_tokens


def until_hit(send, cached_of) -> tuple[list, object]:
    """Sends up to SENDS times until an answer reports cached tokens: (every answer, the one that hit)."""
    answers = []
    for _ in range(SENDS):
        answers.append(send())
        if cached_of(answers[-1]) > 0:
            return answers, answers[-1]
    raise AssertionError(f"no cache hit in {SENDS} sends: {[cached_of(a) for a in answers]}")


def chat(daemon, model: str, messages: list) -> dict:
    return post(daemon, "/chat/completions", {"model": model, "messages": messages, "max_tokens": 16,
                                              "temperature": 0})


def turn_two(daemon) -> tuple[list, str]:
    """Turn 1 answered greedily by both models alike; turn 2's messages, with that answer in them."""
    first = chat(daemon, "nocache", TURN_1)
    assert chat(daemon, "demo", TURN_1)["choices"][0]["message"] == first["choices"][0]["message"]
    assert cached(first["usage"]) == 0
    return [*TURN_1, first["choices"][0]["message"], FOLLOW_UP], first["choices"][0]["message"]["content"]


def streamed(stream) -> tuple[str, object]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, "the usage chunk comes last"
    return text, chunks[-1].usage


def test_turn_two_reuses_turn_one_and_answers_as_without_the_cache(daemon):
    messages, _ = turn_two(daemon)
    plain = chat(daemon, "nocache", messages)
    assert cached(plain["usage"]) == 0
    answers, hit = until_hit(lambda: chat(daemon, "demo", messages), lambda a: cached(a["usage"]))
    usage = hit["usage"]
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert usage["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    for answer in answers:
        assert answer["choices"][0]["message"] == plain["choices"][0]["message"], "the cache changed an answer"
        assert answer["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        figures = answer["usage"]
        assert figures["total_tokens"] == figures["prompt_tokens"] + figures["completion_tokens"]


def test_a_streamed_turn_two_reports_cached_tokens_in_its_usage_chunk(daemon, client):
    messages, _ = turn_two(daemon)

    def send(model):
        return streamed(client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    plain_text, plain_usage = send("nocache")
    assert plain_usage.prompt_tokens_details.cached_tokens == 0
    answers, (_, usage) = until_hit(lambda: send("demo"), lambda a: cached(a[1]))
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens == plain_usage.prompt_tokens
    assert [text for text, _ in answers] == [plain_text] * len(answers)


def test_a_completion_that_extends_an_earlier_one_reuses_it(daemon, client):
    first = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    longer = PROMPT + first.choices[0].text + " and the"
    plain = client.completions.create(model="nocache", prompt=longer, max_tokens=12, temperature=0)
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    answers, hit = until_hit(lambda: client.completions.create(model="demo", prompt=longer, max_tokens=12,
                                                               temperature=0), lambda a: cached(a.usage))
    assert 0 < hit.usage.prompt_tokens_details.cached_tokens < hit.usage.prompt_tokens == plain.usage.prompt_tokens
    assert [a.choices[0].text for a in answers] == [plain.choices[0].text] * len(answers)
    answers, (_, usage) = until_hit(lambda: streamed(client.completions.create(
        model="demo", prompt=longer, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})), lambda a: cached(a[1]))
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert [text for text, _ in answers] == [plain.choices[0].text] * len(answers)


def test_grpc_generate_reports_cached_tokens_and_status_and_metrics_show_the_worker_that_hit(daemon):
    prompt = "The functions of the module read the data that the users give to it, and"

    def generate(model):
        return daemon.generate(prompt, model=model, max_tokens=12, temperature=0)
    plain = generate("nocache")
    assert plain[-1].finish.usage.cached_tokens == 0
    answers, hit = until_hit(lambda: generate("demo"), lambda messages: messages[-1].finish.usage.cached_tokens)
    finish = hit[-1].finish
    assert 0 < finish.usage.cached_tokens < finish.usage.prompt_tokens == plain[-1].finish.usage.prompt_tokens
    assert [[m.token_id for m in a[:-1]] for a in answers] == [[m.token_id for m in plain[:-1]]] * len(answers)
    served = finish.worker_id

    printed = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir),
                              "status", "--json"], capture_output=True, text=True, timeout=60, check=True)
    status = json.loads(printed.stdout)
    workers = {w["id"]: w for w in status["workers"]}
    cache = workers[served]["prefix_cache"]
    assert cache["bytes"] > 0 and cache["entries"] > 0 and cache["hit_tokens"] >= finish.usage.cached_tokens
    assert cache["budget_bytes"] == cache["configured_bytes"] == 8 << 20 and cache["bytes"] <= cache["budget_bytes"]
    assert cache["miss_tokens"] > 0 and workers[served]["prefix_cache_note"] == ""
    off = workers["nocache-0"]["prefix_cache"]
    assert (off["bytes"], off["budget_bytes"], off["configured_bytes"], off["hit_tokens"]) == (0, 0, 0, 0)
    table = format_status(status).splitlines()
    column = next(line for line in table if line.startswith("WORKER ")).index("CACHE")
    assert next(line for line in table if line.startswith(served + " "))[column:].startswith(
        f"{format_bytes(cache['bytes'])}/8.0MiB ")
    assert next(line for line in table if line.startswith("nocache-0 "))[column:].startswith("- ")

    def scraped():  # the scrape reads the worker's last health probe (every 0.5 s)
        hits = metric(daemon, "mpsd_prefix_cache_hit_tokens_total", model="demo", worker=served)
        return hits >= cache["hit_tokens"] and hits
    wait_for(scraped, 10, "the hits on /metrics")
    assert metric(daemon, "mpsd_prefix_cache_bytes", model="demo", worker=served) > 0
    assert metric(daemon, "mpsd_prefix_cache_budget_bytes", model="demo", worker=served) == 8 << 20
    assert metric(daemon, "mpsd_prefix_cache_miss_tokens_total", model="demo", worker=served) > 0
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert "mpsd_prefix_cache_evictions_total{" in text and 'worker="nocache-0"' not in "".join(
        line for line in text.splitlines() if line.startswith("mpsd_prefix_cache"))


def test_the_status_api_of_the_page_carries_the_cache_too(daemon):
    with urllib.request.urlopen(daemon.metrics_url.removesuffix("metrics") + "api/status", timeout=10) as response:
        workers = {w["id"]: w for w in json.load(response)["workers"]}
    assert set(workers) == {"demo-0", "demo-1", "nocache-0"}
    assert all(w["prefix_cache"]["configured_bytes"] == 8 << 20 for i, w in workers.items() if i.startswith("demo-"))
    assert sum(w["prefix_cache"]["hit_tokens"] for w in workers.values()) > 0
    assert all("prefix_cache_note" in w for w in workers.values())


def test_a_conversation_stays_on_the_worker_that_holds_it_and_every_later_turn_hits(daemon):
    """Both workers idle: least-loaded routing would alternate them (the one assigned longest ago first), so each
    turn would land where the previous one was not. gRPC Chat, whose finish names the worker."""
    messages = [inference_pb2.ChatMessage(role="system", content="You answer questions about the module's tools."),
                inference_pb2.ChatMessage(role="user", content="Which tools does the module give its users?")]
    served, hits = [], []
    for question in ("How are they called?", "What do they return?", "Which one reads the data?"):
        replies = list(daemon.inference().Chat(inference_pb2.ChatRequest(
            model="demo", messages=messages, max_tokens=12, temperature=0), timeout=60))
        finish = replies[-1].finish
        served.append(finish.worker_id)
        hits.append(finish.usage.cached_tokens)
        answer = "".join(r.text for r in replies[:-1])
        messages = [*messages, inference_pb2.ChatMessage(role="assistant", content=answer),
                    inference_pb2.ChatMessage(role="user", content=question)]
    assert len(set(served)) == 1, f"one conversation's turns went to {served}"
    assert hits[0] == 0 and all(h > 0 for h in hits[1:]), f"cached tokens per turn: {hits}"
