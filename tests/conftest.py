import pathlib
import subprocess
import sys

import pytest

from mpsd import paths
from support import Daemon, data_dir, demo_config, running_daemon

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")


LONGEST_FIRST = ("reliability", "service", "integration")  # then unit


def pytest_collection_modifyitems(items) -> None:
    """The folders whose files take longest come first, each file's tests kept together: split over processes
    (./dev test), no long file is left to run alone at the end."""
    here = pathlib.Path(__file__).resolve().parent

    def rank(item) -> int:
        folder = pathlib.Path(str(item.fspath)).resolve().relative_to(here).parts[0]
        return LONGEST_FIRST.index(folder) if folder in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)


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


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """The system's headless Chromium driven by Selenium (never a downloaded browser); skips, saying why, without it."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no system Chromium ({', '.join(missing)} missing): apt-get install chromium chromium-driver "
                    "(.ci/run does this when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1400",
                 "--force-prefers-reduced-motion"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # fresh: no state between runs
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
