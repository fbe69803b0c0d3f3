"""The Predict batcher (worker/predict_batcher.py): what is stacked with what, split back, run alone or dropped.

The batcher runs its real thread here; the model is a numpy function that
records each forward pass, so every test says exactly which passes ran.
Requests are queued before the batch closes by a delay far longer than any
test (or by reaching max_batch_size), so no assertion depends on timing.
"""

import concurrent.futures
import pathlib
import threading

import numpy as np
import pytest

from mpsd.config import ConfigError, parse_config
from mpsd.generate_params import InvalidRequest
from mpsd.worker.predict_batcher import PendingPredict, PredictBatcher, batch_key, group, split
from mpsd.worker.scheduler import DeadlinePassed

LONG_DELAY_S = 60.0  # a batch closes by reaching its size, or at stop(): never by this delay in a test


class RecordingModel:
    """Doubles its input `x`; refuses rows holding a negative number, as a model refuses malformed input."""

    def __init__(self, outputs=None) -> None:
        self.passes: list[dict] = []
        self.outputs = outputs or (lambda inputs: {"y": inputs["x"] * 2})
        self.lock = threading.Lock()

    def __call__(self, inputs: dict) -> dict:
        with self.lock:
            self.passes.append(inputs)
        if (inputs["x"] < 0).any():
            raise InvalidRequest("inputs['x']: the model rejected them: negative")
        return self.outputs(inputs)

    @property
    def pass_rows(self) -> list[int]:
        return [len(p["x"]) for p in self.passes]


def rows(*values: float, width: int = 3) -> dict:
    return {"x": np.array([[v] * width for v in values], dtype=np.float32)}


@pytest.fixture
def started():
    batchers: list[PredictBatcher] = []

    def start(model, max_batch_size: int, delay_s: float = LONG_DELAY_S, **options) -> PredictBatcher:
        batcher = PredictBatcher(model, max_batch_size, delay_s, **options)
        batcher.start()
        batchers.append(batcher)
        return batcher

    yield start
    for batcher in batchers:
        batcher.stop()


def results(futures) -> list:
    return [f.result(timeout=30) for f in futures]


# -- what stacks with what -------------------------------------------------------------------------------------


def test_requests_stack_when_names_dtypes_and_all_but_the_first_dimension_agree():
    assert batch_key(rows(1.0)) == batch_key(rows(1.0, 2.0, 3.0))
    assert batch_key(rows(1.0)) != batch_key(rows(1.0, width=4))
    assert batch_key(rows(1.0)) != batch_key({"x": rows(1.0)["x"].astype(np.float64)})
    assert batch_key(rows(1.0)) != batch_key({"input": rows(1.0)["x"]})


def test_a_request_that_cannot_be_split_by_rows_stacks_with_nothing():
    assert batch_key({}) is None
    assert batch_key({"x": np.float32(1.0)}) is None, "a scalar has no rows"
    assert batch_key({"a": np.zeros((2, 3)), "b": np.zeros((5, 3))}) is None, "inputs disagree on their rows"


def test_groups_keep_arrival_order_and_leave_the_unstackable_alone():
    arrivals = (rows(1.0), rows(2.0, width=4), {"x": np.float32(0)}, rows(3.0), {"x": np.float32(1)},
                rows(4.0, width=4))
    pending = [PendingPredict(inputs, None, 0.0) for inputs in arrivals]
    assert [[pending.index(p) for p in members] for members in group(pending)] == [[0, 3], [1, 5], [2], [4]]


def test_split_gives_each_request_its_rows_or_nothing_when_the_batch_is_not_the_first_dimension():
    outputs = {"y": np.arange(12).reshape(6, 2), "z": np.arange(6)}
    parts = split(outputs, [1, 3, 2])
    assert [p["y"].tolist() for p in parts] == [[[0, 1]], [[2, 3], [4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert [p["z"].tolist() for p in parts] == [[0], [1, 2, 3], [4, 5]]
    assert split({"y": np.zeros((5, 2))}, [1, 3, 2]) is None
    assert split({"y": np.float32(3.0)}, [1, 1]) is None


# -- the thread: one forward pass per batch --------------------------------------------------------------------


def test_a_full_batch_runs_as_one_forward_pass_and_each_request_gets_its_own_rows(started):
    model = RecordingModel()
    batcher = started(model, max_batch_size=3)
    futures = [batcher.submit(rows(1.0)), batcher.submit(rows(2.0, 3.0)), batcher.submit(rows(4.0))]
    answers = results(futures)
    assert model.pass_rows == [4]
    assert [a["y"][:, 0].tolist() for a in answers] == [[2.0], [4.0, 6.0], [8.0]]


def test_requests_that_do_not_stack_run_in_passes_of_their_own(started):
    model = RecordingModel(lambda inputs: {"y": inputs["x"].sum(axis=1, keepdims=True)})
    batcher = started(model, max_batch_size=3)
    futures = [batcher.submit(rows(1.0)), batcher.submit(rows(1.0, width=5)), batcher.submit(rows(2.0))]
    answers = results(futures)
    assert sorted(model.pass_rows) == [1, 2], "the two of width 3 together, the one of width 5 alone"
    assert [a["y"].tolist() for a in answers] == [[[3.0]], [[5.0]], [[6.0]]]


def test_a_malformed_request_fails_alone_and_its_neighbours_get_their_answers(started):
    model = RecordingModel()
    batcher = started(model, max_batch_size=4)
    futures = [batcher.submit(rows(1.0)), batcher.submit(rows(-1.0)), batcher.submit(rows(2.0)),
               batcher.submit(rows(3.0))]
    with pytest.raises(InvalidRequest, match="negative"):
        futures[1].result(timeout=30)
    assert [f.result(timeout=30)["y"][0, 0] for f in (futures[0], futures[2], futures[3])] == [2.0, 4.0, 6.0]
    assert model.pass_rows == [4, 1, 1, 1, 1], "the batch refused, then each request alone"


def test_a_batch_failure_is_reported_once_before_the_requests_run_alone(started):
    reported: list[BaseException] = []
    model = RecordingModel()
    batcher = started(model, max_batch_size=2, on_batch_failure=reported.append)
    results_or_errors = [batcher.submit(rows(-1.0)), batcher.submit(rows(5.0))]
    assert results_or_errors[1].result(timeout=30)["y"][0, 0] == 10.0
    assert isinstance(results_or_errors[0].exception(timeout=30), InvalidRequest)
    assert len(reported) == 1 and isinstance(reported[0], InvalidRequest)


def test_outputs_without_the_batch_first_fall_back_to_one_pass_per_request(started):
    model = RecordingModel(lambda inputs: {"total": inputs["x"].sum(axis=0)})  # reduces across rows
    batcher = started(model, max_batch_size=2)
    answers = results([batcher.submit(rows(1.0, width=4)), batcher.submit(rows(2.0, 3.0, width=4))])
    assert model.pass_rows == [3, 1, 2]
    assert [a["total"].tolist() for a in answers] == [[1.0] * 4, [5.0] * 4]


def test_a_batch_takes_at_most_max_batch_size_requests(started):
    model = RecordingModel()
    batcher = started(model, max_batch_size=2)
    futures = [batcher.submit(rows(float(i))) for i in range(5)]
    assert [a["y"][0, 0] for a in results(futures[:4])] == [0.0, 2.0, 4.0, 6.0]
    assert model.pass_rows == [2, 2], "the fifth waits for a neighbour; stop() runs it at the end of the test"


def test_with_no_delay_what_waits_while_the_model_runs_forms_the_next_batch(started):
    release = threading.Event()

    def slow_then_double(inputs):
        release.wait(30)
        return {"y": inputs["x"] * 2}

    model = RecordingModel(slow_then_double)
    batcher = started(model, max_batch_size=8, delay_s=0.0)
    first = batcher.submit(rows(1.0))
    wait_until(lambda: model.passes, "the first pass")
    later = [batcher.submit(rows(float(i))) for i in range(2, 5)]
    release.set()
    results([first, *later])
    assert model.pass_rows == [1, 3]


# -- requests that are no longer wanted ------------------------------------------------------------------------


def test_a_request_whose_deadline_passed_while_it_waited_is_dropped_not_run(started):
    now = [100.0]
    model = RecordingModel()
    batcher = started(model, max_batch_size=2, clock=lambda: now[0])
    expired = batcher.submit(rows(1.0), deadline=100.5)
    now[0] = 101.0  # the deadline passes while the request waits for a neighbour
    kept = batcher.submit(rows(2.0), deadline=200.0)
    assert kept.result(timeout=30)["y"][0, 0] == 4.0
    with pytest.raises(DeadlinePassed):
        expired.result(timeout=30)
    assert model.pass_rows == [1], "only the live request ran"


def test_a_request_cancelled_while_it_waited_is_dropped_not_run(started):
    model = RecordingModel()
    batcher = started(model, max_batch_size=2)
    left = batcher.submit(rows(1.0))
    assert left.cancel(), "a queued request can be cancelled (its client left)"
    kept = batcher.submit(rows(2.0))
    assert kept.result(timeout=30)["y"][0, 0] == 4.0
    assert model.pass_rows == [1]
    with pytest.raises(concurrent.futures.CancelledError):
        left.result(timeout=1)


def test_stop_runs_what_waits_then_refuses_more():
    model = RecordingModel()
    batcher = PredictBatcher(model, 4, LONG_DELAY_S)
    batcher.start()
    waiting = [batcher.submit(rows(1.0)), batcher.submit(rows(2.0))]
    batcher.stop()
    assert [f.result(timeout=0)["y"][0, 0] for f in waiting] == [2.0, 4.0]
    assert model.pass_rows == [2]
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.submit(rows(3.0))


def wait_until(predicate, what: str, timeout_s: float = 30.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- the config keys -------------------------------------------------------------------------------------------


def model_config(extra: str, backend: str = "torch-module"):
    source = "factory = 'pkg.mod:make'" if backend == "torch-module" else "path = '@demo'"
    text = f"[[models]]\nname = 'mlp'\nbackend = '{backend}'\n{source}\n{extra}\n"
    return parse_config(text, source="test.toml", base_dir=pathlib.Path("/cfg")).models[0]


def test_batching_is_off_by_default_and_concurrency_holds_two_batches_when_on():
    plain = model_config("")
    assert (plain.max_batch_size, plain.max_batch_delay_s, plain.concurrency) == (1, 0.0, 1)
    batched = model_config("max_batch_size = 16")
    assert (batched.max_batch_size, batched.max_batch_delay_s, batched.concurrency) == (16, 0.0, 32)
    assert model_config("max_batch_size = 8\nmax_batch_delay = '5ms'\nconcurrency = 8").max_batch_delay_s == 0.005


@pytest.mark.parametrize("extra, backend, message", [
    ("max_batch_size = 0", "torch-module", r"models\[0\] \(mlp\).max_batch_size: must be an integer >= 1, got 0"),
    ("max_batch_size = 8\nconcurrency = 4", "torch-module",
     r"models\[0\] \(mlp\).max_batch_size: 8 is above concurrency 4"),
    ("max_batch_delay = 'soon'", "torch-module", r"models\[0\] \(mlp\).max_batch_delay: expected a duration"),
    ("max_batch_size = 8", "torch-lm", r"models\[0\] \(mlp\).max_batch_size: applies to backend torch-module only"),
    ("max_batch_delay = '1ms'", "torch-lm", r"models\[0\] \(mlp\).max_batch_delay: applies to backend torch-module"),
])
def test_a_bad_batching_key_is_refused_with_the_key_named(extra, backend, message):
    with pytest.raises(ConfigError, match=message):
        model_config(extra, backend)
