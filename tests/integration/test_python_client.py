"""mpsd.client against a real daemon: tokens as they stream, Predict with numpy, errors by meaning."""

import asyncio

import numpy as np
import pytest
import torch

from mpsd.client import AsyncClient, Client, InvalidRequest, ModelNotFound, MpsdError, Token, Unavailable
from support import DEMO_AND_LINEAR, running_daemon

BUGGY = """
[[models]]
name = "buggy"
backend = "torch-module"
factory = "fixtures.tiny_modules:bug_in_forward"
threads = 1
"""


@pytest.fixture(scope="module")
def daemon(demo_model, tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("client"), DEMO_AND_LINEAR + BUGGY, 3) as daemon:
        yield daemon


def expected_linear(x: np.ndarray) -> np.ndarray:
    torch.manual_seed(1234)
    return torch.nn.Linear(4, 2)(torch.from_numpy(x)).detach().numpy()


def test_sync_generate_streams_tokens_and_reports_the_finish(daemon):
    with Client(daemon.address) as client:
        stream = client.generate("The module", "demo", max_tokens=12, temperature=0)
        tokens = list(stream)
        assert all(isinstance(t, Token) for t in tokens) and [t.index for t in tokens] == list(range(12))
        assert stream.finish.reason == "length" and stream.finish.completion_tokens == 12
        assert stream.finish.worker_id == "demo-0"
        expected = "".join(m.text for m in daemon.generate("The module", max_tokens=12, temperature=0))
        assert "".join(t.text for t in tokens) == expected
        assert client.generate("The module", "demo", max_tokens=12, temperature=0).text() == expected


def test_sync_predict_and_typed_errors(daemon):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Client(daemon.address) as client:
        outputs = client.predict("linear", {"input": x})
        np.testing.assert_allclose(outputs["output"], expected_linear(x), rtol=1e-5)
        with pytest.raises(ModelNotFound, match="no model named 'nope'"):
            list(client.generate("The", "nope"))
        with pytest.raises(InvalidRequest, match="max_tokens") as bad:
            list(client.generate("The", "demo", max_tokens=0))
        assert bad.value.code.name == "INVALID_ARGUMENT"
        with pytest.raises(InvalidRequest, match="does not serve Generate") as wrong:
            list(client.generate("The", "linear"))
        assert wrong.value.code.name == "FAILED_PRECONDITION"
        with pytest.raises(InvalidRequest, match="dtype"):
            client.predict("linear", {"input": np.zeros(4, dtype=np.complex64)})


def test_async_client_generates_concurrently_and_predicts(daemon):
    async def scenario():
        async with AsyncClient(daemon.address) as client:
            streams = [client.generate("The", "demo", max_tokens=8, temperature=0) for _ in range(3)]
            texts = await asyncio.gather(*(s.text() for s in streams))
            assert len(set(texts)) == 1 and all(s.finish.completion_tokens == 8 for s in streams)
            outputs = await client.predict("linear", {"input": np.ones((1, 4), dtype=np.float32)})
            assert outputs["output"].shape == (1, 2)
            with pytest.raises(ModelNotFound):
                [t async for t in client.generate("The", "nope")]
    asyncio.run(scenario())


def test_no_daemon_is_unavailable(tmp_path):
    with Client("127.0.0.1:9", timeout=5) as client, pytest.raises(Unavailable):
        list(client.generate("The"))


def test_a_model_that_raises_is_an_internal_error_naming_the_worker_not_a_lost_worker(daemon):
    pid = daemon.worker("buggy-0")["pid"]
    with Client(daemon.address) as client:
        with pytest.raises(MpsdError) as failed:
            client.predict("buggy", {"input": np.ones((2, 4), dtype=np.float32)})
        assert failed.value.code.name == "INTERNAL" and "worker buggy-0 failed" in failed.value.details
        assert "fixture: a bug inside the model" in failed.value.details
        with pytest.raises(InvalidRequest, match="the model rejected them"):  # an input the model cannot take
            client.predict("linear", {"input": np.ones((2, 5), dtype=np.float32)})
    assert daemon.worker("buggy-0")["pid"] == pid and daemon.worker("buggy-0")["state"] == "READY"
