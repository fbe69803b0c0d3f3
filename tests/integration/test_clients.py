"""Clients that do not use our generated Python code: the Node.js client, and a Python client built from reflection.

Both prove the public contract is enough on its own: the .proto file (Node) or what the server says about
itself (reflection), with nothing from daemon/mpsd/v1.
"""

import os
import re
import shutil
import subprocess

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from support import ROOT

NODE_CLIENT = ROOT / "clients" / "node"
PROMPT = "The module provides"
SUMMARY = re.compile(r"^\[length: (\d+) prompt \+ 20 generated tokens, worker (\S+) pid (\d+)\]$", re.M)


def node_generate(*args: str) -> subprocess.CompletedProcess:
    return node_run("generate.js", *args)


def node_run(script: str, *args: str) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Node client needs Node.js 18+)")
    if not (NODE_CLIENT / "node_modules").is_dir():
        pytest.skip("clients/node/node_modules is missing: run ./dev setup (or npm ci in clients/node)")
    # The developer's own daemon settings must not leak into a run against the test daemon.
    env = {k: v for k, v in os.environ.items() if k not in ("MPSD_ADDRESS", "MPSD_TOKEN_FILE", "MPSD_TLS_CA")}
    return subprocess.run([node, str(NODE_CLIENT / script), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_node_client_streams_what_python_gets(shared_daemon):
    result = node_generate("--address", shared_daemon.address, "--model", "demo",
                           "--max-tokens", "20", "--temperature", "0", PROMPT)
    assert result.returncode == 0, result.stderr
    # Greedy decoding is deterministic, so both clients must see the same text whichever worker serves them;
    # had --temperature 0 not reached the daemon (proto3 optional presence), Node would have sampled at 1.0.
    expected = "".join(m.text for m in shared_daemon.generate(PROMPT, max_tokens=20, temperature=0))
    assert expected and result.stdout == expected + "\n"
    summary = SUMMARY.search(result.stderr)
    assert summary, result.stderr
    workers = {w["id"]: w["pid"] for w in shared_daemon.status()["workers"]}
    assert workers[summary.group(2)] == int(summary.group(3))


def test_node_client_reports_a_grpc_error(shared_daemon):
    result = node_generate("--address", shared_daemon.address, "--model", "no-such-model", PROMPT)
    assert result.returncode == 1
    assert result.stderr.startswith("mpsd: NOT_FOUND: ") and "no-such-model" in result.stderr
    assert result.stdout == ""


def test_node_client_chats_as_python_does(shared_daemon):
    from mpsd.client import Client

    result = node_run("chat.js", "--address", shared_daemon.address, "--model", "demo", "--system", "Be brief.",
                      "--max-tokens", "12", "--temperature", "0", "Hello")
    assert result.returncode == 0, result.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    with Client(shared_daemon.address) as client:
        expected = client.chat(messages, "demo", max_tokens=12, temperature=0).text()
    assert expected and result.stdout == expected + "\n"
    assert "12 generated tokens, worker demo-" in result.stderr


def describe_and_generate(address: str, prompt: str) -> tuple[set[str], descriptor.MethodDescriptor, str]:
    """What a client with only grpc and protobuf, and none of our files, learns and gets from the public port."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        # A pool of its own: the default pool already holds mpsd.v1 from the support module's imports.
        pool = descriptor_pool.DescriptorPool(database)
        generate = pool.FindServiceByName("mpsd.v1.Inference").methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(generate.input_type)
        response_class = message_factory.GetMessageClass(generate.output_type)
        call = channel.unary_stream("/mpsd.v1.Inference/Generate", request_serializer=request_class.SerializeToString,
                                    response_deserializer=response_class.FromString)
        request = request_class(model="demo", prompt=prompt, max_tokens=8, temperature=0)
        text = "".join(message.text for message in call(request, timeout=60))
    return services, generate, text


def test_reflection_alone_describes_and_serves_the_api(shared_daemon):
    services, generate, text = describe_and_generate(shared_daemon.address, PROMPT)
    assert {"mpsd.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert generate.server_streaming and not generate.client_streaming
    assert generate.input_type.full_name == "mpsd.v1.GenerateRequest"
    assert generate.output_type.full_name == "mpsd.v1.GenerateResponse"
    assert text == "".join(m.text for m in shared_daemon.generate(PROMPT, max_tokens=8, temperature=0))
