import pathlib
import subprocess
import sys

import pytest

from mpsd import paths
from support import Daemon, data_dir, demo_config, running_daemon


@pytest.fixture(scope="session")
def demo_model() -> pathlib.Path:
    """Builds the demo model once, the way the daemon does (a no-op when ./dev already built it)."""
    subprocess.run(
        [sys.executable, "-m", "mpsd.cli.mpsd_cmd", "build-demo", "--data-dir", str(data_dir())],
        check=True, timeout=600,
    )
    return paths.demo_model_dir(data_dir())


@pytest.fixture(scope="session")
def demo_model_dir(demo_model) -> pathlib.Path:
    return demo_model


@pytest.fixture(scope="session")
def slow_model(demo_model) -> pathlib.Path:
    from fixtures.slow_model import ensure_slow_model

    return ensure_slow_model(demo_model, data_dir() / "models" / "test-slow-gpt2")


@pytest.fixture(scope="module")
def shared_daemon(demo_model, slow_model, tmp_path_factory):
    """One daemon with two demo and two slow workers, shared by a module's tests to save start-up time."""
    with running_daemon(tmp_path_factory.mktemp("mpsd"), demo_config(replicas=2, queue=2, slow_model=slow_model), 4) as daemon:
        yield daemon


@pytest.fixture
def make_daemon(demo_model, tmp_path):
    """A daemon of the test's own, for tests that stop or kill it."""
    daemons: list[Daemon] = []

    def make(config_text: str) -> Daemon:
        daemon = Daemon(tmp_path / f"d{len(daemons)}", config_text)
        daemons.append(daemon)
        return daemon.start()

    try:
        yield make
    finally:
        for daemon in daemons:
            daemon.close()


@pytest.fixture(scope="session")
def mlx_demo_model(demo_model) -> pathlib.Path:
    """The MLX demo model (llama-style, seeded), built the way `mpsd build-demo --mlx` does."""
    pytest.importorskip("mlx_lm")
    subprocess.run(
        [sys.executable, "-m", "mpsd.cli.mpsd_cmd", "build-demo", "--mlx", "--data-dir", str(data_dir())],
        check=True, timeout=600,
    )
    return paths.mlx_demo_model_dir(data_dir())
