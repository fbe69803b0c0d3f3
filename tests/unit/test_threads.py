from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.worker_env import default_threads


def model(replicas, threads=0):
    return ModelConfig(name="m", backend="torch-lm", path="x", replicas=replicas, threads=threads)


def test_threads_split_cores_and_keep_one_for_the_daemon_when_there_is_one_to_spare():
    assert default_threads(model(1), (model(1),), 2) == 1
    assert default_threads(model(2), (model(2),), 2) == 1
    assert default_threads(model(2), (model(2),), 16) == 7
    assert default_threads(model(4), (model(4),), 3) == 1
    assert default_threads(model(1, threads=6), (model(1),), 2) == 6
