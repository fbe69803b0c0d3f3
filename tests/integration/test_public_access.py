"""The public ports beyond loopback (gRPC and the HTTP edge: the OpenAI-compatible API, /metrics, the status page):
refused without TLS and a token; with them, only token holders get in, to all of it."""

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mpsd.v1 import inference_pb2, inference_pb2_grpc
from support import data_dir, demo_config, running_daemon

TOKEN = "s3cret-token-for-the-access-test-0123456789"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost, and a 0600 token file."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True)
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return folder


def serve(tmp_path, listen: str, extra: str = "") -> subprocess.CompletedProcess:
    config = tmp_path / "mpsd.toml"
    config.write_text(f"[daemon]\n{extra}\n" + demo_config(replicas=1).replace("[daemon]\n", ""))
    return subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "serve", "--config", str(config), "--listen", listen,
                           "--state-dir", str(tmp_path / "state"), "--data-dir", str(data_dir())],
                          capture_output=True, text=True, timeout=60)


def test_a_non_loopback_address_is_refused_without_tls_and_a_token(tmp_path, tls_files):
    bare = serve(tmp_path, "0.0.0.0:0")
    assert bare.returncode == 1 and "tls_cert and tls_key and token_file must be set" in bare.stderr
    token_only = serve(tmp_path, "0.0.0.0:0", f'token_file = "{tls_files / "token"}"')
    assert token_only.returncode == 1 and "tls_cert and tls_key must be set" in token_only.stderr
    (tls_files / "open-token").write_text(TOKEN)
    (tls_files / "open-token").chmod(0o644)
    open_token = serve(tmp_path, "127.0.0.1:0", f'token_file = "{tls_files / "open-token"}"')
    assert open_token.returncode == 1 and "open to other users (mode 0644)" in open_token.stderr
    assert "public API listening" not in bare.stderr + token_only.stderr + open_token.stderr


def test_the_http_api_beyond_loopback_is_refused_without_tls_and_a_token(tmp_path, tls_files):
    bare = serve(tmp_path, "127.0.0.1:0", 'http_listen = "0.0.0.0:0"')
    assert bare.returncode == 1
    assert "http_listen '0.0.0.0:0' is not loopback" in bare.stderr and "tls_cert and tls_key and token_file" in bare.stderr
    token_only = serve(tmp_path, "127.0.0.1:0", f'http_listen = "0.0.0.0:0"\ntoken_file = "{tls_files / "token"}"')
    assert token_only.returncode == 1 and "http_listen '0.0.0.0:0' is not loopback" in token_only.stderr
    assert "HTTP edge listening" not in bare.stderr + token_only.stderr


def test_metrics_listen_beyond_loopback_is_refused_without_tls_and_a_token_and_says_why(tmp_path):
    """It was plain HTTP for anyone before /metrics moved onto the HTTP edge: the refusal names the key and the way."""
    refused = serve(tmp_path, "127.0.0.1:0", 'metrics_listen = "0.0.0.0:0"')
    assert refused.returncode == 1 and "metrics_listen '0.0.0.0:0' is not loopback" in refused.stderr
    assert "tls_cert and tls_key and token_file must be set" in refused.stderr
    assert "/metrics is now served by the HTTP edge under the API's rule" in refused.stderr
    assert "HTTP edge listening" not in refused.stderr


@pytest.fixture(scope="module")
def exposed_daemon(demo_model, tls_files, tmp_path_factory):
    extra = (f'tls_cert = "{tls_files / "cert.pem"}"\ntls_key = "{tls_files / "key.pem"}"\n'
             f'token_file = "{tls_files / "token"}"\n')
    config = f"[daemon]\n{extra}" + demo_config(replicas=1).replace("[daemon]\n", "")
    with running_daemon(tmp_path_factory.mktemp("exposed"), config, 1, listen="0.0.0.0:0", http_listen="0.0.0.0:0") as daemon:
        yield daemon


def tls_channel(daemon, tls_files) -> grpc.Channel:
    port = daemon.address.rpartition(":")[2]
    return grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials((tls_files / "cert.pem").read_bytes()))


def generate(channel, metadata=()):
    stub = inference_pb2_grpc.InferenceStub(channel)
    return list(stub.Generate(inference_pb2.GenerateRequest(model="demo", prompt="The", max_tokens=4), timeout=30,
                              metadata=metadata))


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-token-of-some-length"),),
                                      (("authorization", "Basic " + TOKEN),), (("authorization", "Bearer"),)],
                         ids=["none", "wrong", "other-scheme", "empty"])
def test_calls_without_the_token_get_unauthenticated(exposed_daemon, tls_files, metadata):
    with tls_channel(exposed_daemon, tls_files) as channel, pytest.raises(grpc.RpcError) as refused:
        generate(channel, metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in refused.value.details()


def test_the_token_over_tls_streams_and_health_stays_open(exposed_daemon, tls_files):
    assert "listening on 0.0.0.0:" in exposed_daemon.log() and "(TLS, bearer token required)" in exposed_daemon.log()
    with tls_channel(exposed_daemon, tls_files) as channel:
        answer = generate(channel, (("authorization", f"Bearer {TOKEN}"),))
        assert answer[-1].HasField("finish") and answer[-1].finish.usage.completion_tokens == 4
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="demo"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:  # reflection tells what is served: token holders only
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_is_not_spoken_on_a_tls_port(exposed_daemon):
    port = exposed_daemon.address.rpartition(":")[2]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
        generate(channel, (("authorization", f"Bearer {TOKEN}"),))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mpsctl_generate_with_ca_and_token_file(exposed_daemon, tls_files):
    port = exposed_daemon.address.rpartition(":")[2]
    base = [sys.executable, "-m", "mpsd.cli.mpsctl", "generate", "The", "--max-tokens", "3", "--address", f"127.0.0.1:{port}",
            "--tls-ca", str(tls_files / "cert.pem")]
    ok = subprocess.run(base + ["--token-file", str(tls_files / "token")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "3 generated tokens" in ok.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr


def test_the_node_client_speaks_tls_with_the_token(exposed_daemon, tls_files):
    from test_clients import node_generate

    port = exposed_daemon.address.rpartition(":")[2]
    base = ["--address", f"127.0.0.1:{port}", "--tls-ca", str(tls_files / "cert.pem"), "--max-tokens", "3", "The"]
    ok = node_generate("--token-file", str(tls_files / "token"), *base)
    assert ok.returncode == 0 and "3 generated tokens" in ok.stderr, ok.stderr
    refused = node_generate(*base)
    assert refused.returncode == 1 and "mpsd: UNAUTHENTICATED" in refused.stderr


def https_url(daemon) -> str:
    return "https://127.0.0.1:" + daemon.http_url.rpartition(":")[2]


def https_client(daemon, tls_files, token: str):
    import openai

    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=tls_files / "cert.pem"))
    return openai.OpenAI(base_url=https_url(daemon), api_key=token, max_retries=0, http_client=http_client)


def test_the_http_api_over_tls_takes_the_same_token(exposed_daemon, tls_files):
    import openai

    assert exposed_daemon.http_url.startswith("https://0.0.0.0:")
    with https_client(exposed_daemon, tls_files, TOKEN) as client:
        answer = client.completions.create(model="demo", prompt="The", max_tokens=3)
        assert answer.usage.completion_tokens == 3 and [m.id for m in client.models.list()] == ["demo"]
    with https_client(exposed_daemon, tls_files, "wrong-token-of-some-length") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
    assert refused.value.status_code == 401 and "bearer token" in refused.value.message
    context = ssl.create_default_context(cafile=tls_files / "cert.pem")
    with pytest.raises(urllib.error.HTTPError) as no_token:  # no Authorization header at all
        urllib.request.urlopen(https_url(exposed_daemon) + "/models", context=context, timeout=30)
    assert no_token.value.code == 401 and json.loads(no_token.value.read())["error"]["code"] == "invalid_api_key"


def https_status(url: str, tls_files, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context(cafile=tls_files / "cert.pem")
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_beyond_loopback_the_metrics_and_the_status_page_are_served_to_token_holders(exposed_daemon, tls_files):
    base = https_url(exposed_daemon).removesuffix("/v1")
    assert f"HTTP edge listening on https://0.0.0.0:{base.rpartition(':')[2]} (/v1, /metrics, status page /) " \
           "(TLS, bearer token required)" in exposed_daemon.log()
    for path in ("/metrics", "/api/status", "/api/history"):
        assert https_status(base + path, tls_files, None)[0] == 401
        assert https_status(base + path, tls_files, "wrong-token-of-some-length")[0] == 401
        assert https_status(base + path, tls_files, TOKEN)[0] == 200
    assert b"mpsd_requests_total" in https_status(base + "/metrics", tls_files, TOKEN)[1]
    assert json.loads(https_status(base + "/api/status", tls_files, TOKEN)[1])["workers"][0]["state"] == "READY"
    status, page = https_status(base + "/", tls_files, None)  # the shell, with no data in it: the browser asks
    assert status == 200 and b"mpsd status" in page
