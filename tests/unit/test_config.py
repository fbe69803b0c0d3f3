import pathlib

import pytest

from mpsd.config import ConfigError, HttpLimits, load_config, parse_config


def parse(text: str, tmp_path: pathlib.Path = pathlib.Path("/cfg")):
    return parse_config(text, source="test.toml", base_dir=tmp_path)


def test_embedded_default_serves_the_demo_model_with_two_workers():
    config = load_config(None)
    assert config.daemon.listen == "127.0.0.1:7700" and config.daemon.http_listen == "127.0.0.1:7702"
    assert config.daemon.metrics_listen == "", "the HTTP edge serves /metrics; metrics_listen only adds an address"
    assert [(m.name, m.backend, m.path, m.replicas) for m in config.models] == [("demo", "torch-lm", "@demo", 2)]


def test_full_model_table(tmp_path):
    config = parse("""
[daemon]
listen = "127.0.0.1:0"
drain_grace = "5s"
[memory]
probe = "file:mem.json"
budget = "96GiB"
headroom = "4GiB"
[[models]]
name = "lm"
backend = "torch-lm"
path = "models/lm"
replicas = 3
device = "cpu"
concurrency = 2
threads = 1
footprint = "2GiB"
env = { FOO = "bar" }
queue = 5
load_timeout = "1m"
[[models]]
name = "mlp"
backend = "torch-module"
factory = "pkg.mod:make"
""", tmp_path)
    lm, mlp = config.models
    assert lm.path == str(tmp_path / "models/lm")
    assert (lm.replicas, lm.device, lm.concurrency, lm.threads, lm.queue_limit) == (3, "cpu", 2, 1, 5)
    assert lm.footprint_bytes == 2 * 1024**3 and lm.env == {"FOO": "bar"} and lm.load_timeout_s == 60
    assert mlp.factory == "pkg.mod:make" and not mlp.generates
    assert config.memory.budget_bytes == 96 * 1024**3 and config.memory.probe == f"file:{tmp_path / 'mem.json'}"
    assert config.daemon.drain_grace_s == 5


@pytest.mark.parametrize("text,message", [
    ("[[models]]\nname='a'\nbackend='torch-lm'\npath='x'\nreplica=2", r"test.toml: models\[0\].replica: unknown key"),
    ("[[models]]\nname='a'\nbackend='tf'\npath='x'", r"models\[0\] \(a\).backend: must be one of"),
    ("[[models]]\nname='a'\nbackend='torch-lm'", r"models\[0\] \(a\).path: backend torch-lm needs"),
    ("[[models]]\nname='a'\nbackend='torch-module'\nfactory='nocolon'", r"factory: must look like"),
    ("[[models]]\nname='a'\nbackend='torch-lm'\npath='x'\nreplicas='two'", r"replicas: must be an integer >= 0"),
    ("[[models]]\nname='a'\nbackend='torch-lm'\npath='x'\ndevice='gpu'", r"device: must be auto, cpu, mps"),
    ("[[models]]\nname='a'\nbackend='torch-lm'\npath='x'\nfootprint='big'", r"footprint: expected a size"),
    ("[daemon]\nlisten='7700'\n[[models]]\nname='a'\nbackend='torch-lm'\npath='x'", r"daemon.listen: must be HOST:PORT"),
    ("[daemon]\nmetrics_listen='7701'\n[[models]]\nname='a'\nbackend='null-lm'", r"daemon.metrics_listen: must be HOST:PORT"),
    ("[daemon]\nport=1\n[[models]]\nname='a'\nbackend='torch-lm'\npath='x'", r"daemon.port: unknown key"),
    ("[[models]]\nname='a'\nbackend='torch-lm'\npath='x'\n[[models]]\nname='a'\nbackend='torch-lm'\npath='y'", "used twice"),
    ("", "at least one"),
    ("[[models]\n", "not valid TOML"),
    ("[memory]\nprobe='magic'\n[[models]]\nname='a'\nbackend='torch-lm'\npath='x'", r"memory.probe: must be"),
])
def test_errors_name_the_file_and_key(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_log_rotation_keys(tmp_path):
    config = parse("[daemon]\nlog_file = 'logs/mpsd.log'\nlog_max_size = '1MiB'\nlog_backups = 2\n"
                   "[[models]]\nname='a'\nbackend='null-lm'\n", tmp_path)
    assert config.daemon.log_file == tmp_path / "logs/mpsd.log"
    assert (config.daemon.log_max_bytes, config.daemon.log_backups) == (1 << 20, 2)


def test_stream_buffer_is_a_count_of_tokens_of_at_least_one():
    models = "[[models]]\nname='a'\nbackend='null-lm'\n"
    assert parse(models).daemon.stream_buffer == 4096
    assert parse("[daemon]\nstream_buffer = 64\n" + models).daemon.stream_buffer == 64
    for bad in ("0", "'lots'", "1.5"):
        with pytest.raises(ConfigError, match="daemon.stream_buffer"):
            parse(f"[daemon]\nstream_buffer = {bad}\n" + models)


def test_metrics_listen_takes_an_address_or_nothing(tmp_path):
    models = "[[models]]\nname='a'\nbackend='null-lm'\n"
    assert parse("[daemon]\nmetrics_listen = '0.0.0.0:9100'\n" + models).daemon.metrics_listen == "0.0.0.0:9100"
    assert parse("[daemon]\nmetrics_listen = ''\n" + models).daemon.metrics_listen == ""


def test_http_limits_default_and_take_durations_and_sizes():
    models = "[[models]]\nname='a'\nbackend='null-lm'\n"
    assert parse(models).daemon.http_limits == HttpLimits(
        idle_timeout_s=30, head_timeout_s=10, body_timeout_s=60, send_timeout_s=30, max_connections=1024,
        max_body_bytes=8 << 20, max_head_bytes=64 << 10)
    keys = ("[daemon]\nhttp_idle_timeout = '2m'\nhttp_head_timeout = '500ms'\nhttp_body_timeout = 5\n"
            "http_send_timeout = '1s'\nhttp_max_connections = 8\nhttp_max_body = '1MiB'\n")
    limits = parse(keys + models).daemon.http_limits
    assert limits == HttpLimits(idle_timeout_s=120, head_timeout_s=0.5, body_timeout_s=5, send_timeout_s=1,
                                max_connections=8, max_body_bytes=1 << 20)


@pytest.mark.parametrize("keys, message", [
    ("http_head_timeout = 'soon'", r"test.toml: daemon.http_head_timeout: expected a duration like '30s'"),
    ("http_idle_timeout = 0", r"daemon.http_idle_timeout: must be above 0, got 0"),
    ("http_send_timeout = '0s'", r"daemon.http_send_timeout: must be above 0, got '0s'"),
    ("http_body_timeout = -1", r"daemon.http_body_timeout: a duration cannot be negative"),
    ("http_max_connections = 0", r"daemon.http_max_connections: must be an integer >= 1, got 0"),
    ("http_max_body = 'huge'", r"daemon.http_max_body: expected a size like '8GiB'"),
    ("http_max_body = 0", r"daemon.http_max_body: must be above 0, got 0"),
    ("http_max_head = '1MiB'", r"daemon.http_max_head: unknown key"),
])
def test_a_bad_http_limit_is_refused_naming_its_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse(f"[daemon]\n{keys}\n[[models]]\nname='a'\nbackend='null-lm'\n")


def test_http_listen_defaults_to_loopback_and_takes_an_address_or_nothing(tmp_path):
    models = "[[models]]\nname='a'\nbackend='null-lm'\n"
    assert parse(models).daemon.http_listen == "127.0.0.1:7702"
    assert parse("[daemon]\nhttp_listen = ''\n" + models).daemon.http_listen == ""
    with pytest.raises(ConfigError, match=r"daemon.http_listen: must be HOST:PORT"):
        parse("[daemon]\nhttp_listen = '7702'\n" + models)


MODEL_A = "[[models]]\nname='a'\nbackend='null-lm'\n"


def demand_of(keys: str) -> tuple:
    model = parse(MODEL_A + keys).models[0]
    return model.replicas, model.min_replicas, model.max_replicas, model.keep_alive_s, model.priority, model.scale_up_queue


@pytest.mark.parametrize("keys,expected", [
    ("", (1, 1, 1, 300.0, 0, 1)),                                  # a static model, as before demand
    ("replicas = 3", (3, 3, 3, 300.0, 0, 1)),                      # min = max = replicas
    ("min_replicas = 2", (2, 2, 2, 300.0, 0, 1)),                  # replicas defaults to min_replicas
    ("min_replicas = 0\nmax_replicas = 3", (0, 0, 3, 300.0, 0, 1)),  # load on the first request
    ("min_replicas = 0", (0, 0, 1, 300.0, 0, 1)),                  # demand-driven: one worker when requested
    ("replicas = 0", (0, 0, 0, 300.0, 0, 1)),                      # static and empty, as before demand
    ("min_replicas = 1\nreplicas = 2\nmax_replicas = 4", (2, 1, 4, 300.0, 0, 1)),
    ("keep_alive = -1", (1, 1, 1, None, 0, 1)),                   # never stopped for idleness
    ("keep_alive = '-1'", (1, 1, 1, None, 0, 1)),
    ("keep_alive = '90s'", (1, 1, 1, 90.0, 0, 1)),
    ("keep_alive = 0", (1, 1, 1, 0.0, 0, 1)),
    ("priority = -5\nscale_up_queue = 4", (1, 1, 1, 300.0, -5, 4)),
])
def test_demand_keys_and_their_defaults(keys, expected):
    assert demand_of(keys) == expected


def test_min_residency_defaults_to_thirty_seconds():
    assert parse(MODEL_A).memory.min_residency_s == 30.0
    assert parse("[memory]\nmin_residency = '1s'\n" + MODEL_A).memory.min_residency_s == 1.0


@pytest.mark.parametrize("keys,message", [
    ("min_replicas = 3\nmax_replicas = 2\nreplicas = 2", r"models\[0\] \(a\)\.min_replicas: 3 is above max_replicas 2"),
    ("min_replicas = 3\nmax_replicas = 2", r"models\[0\] \(a\)\.min_replicas: 3 is above max_replicas 2"),
    ("replicas = 3\nmax_replicas = 2", r"models\[0\] \(a\)\.replicas: 3 is above max_replicas 2"),
    ("replicas = 1\nmin_replicas = 2", r"models\[0\] \(a\)\.replicas: 1 is below min_replicas 2"),
    ("min_replicas = -1", r"models\[0\] \(a\)\.min_replicas: must be an integer >= 0, got -1"),
    ("max_replicas = 'two'", r"models\[0\] \(a\)\.max_replicas: must be an integer >= 0"),
    ("keep_alive = -2", r"models\[0\] \(a\)\.keep_alive: must be a duration like '5m', or -1 for never, got -2"),
    ("keep_alive = -0.5", r"models\[0\] \(a\)\.keep_alive: must be a duration like '5m', or -1 for never"),
    ("keep_alive = '-5s'", r"models\[0\] \(a\)\.keep_alive: expected a duration"),
    ("keep_alive = true", r"models\[0\] \(a\)\.keep_alive: expected a duration"),
    ("scale_up_queue = 0", r"models\[0\] \(a\)\.scale_up_queue: must be an integer >= 1, got 0"),
    ("priority = 'high'", r"models\[0\] \(a\)\.priority: must be an integer"),
    ("min_replica = 1", r"test.toml: models\[0\]\.min_replica: unknown key"),
    ("[memory]\nmin_residency = -1", r"memory\.min_residency: a duration cannot be negative"),
    ("[memory]\nresidency = '1s'", r"memory\.residency: unknown key"),
])
def test_demand_errors_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse(MODEL_A + keys)


def lm(backend: str, keys: str = "") -> str:
    path = "" if backend == "null-lm" else "path = 'x'\n"
    return f"[[models]]\nname = 'a'\nbackend = '{backend}'\n{path}{keys}\n"


@pytest.mark.parametrize("backend,keys,expected", [
    ("torch-lm", "", (None, 0.25)),                        # on by default for the backends that keep one
    ("mlx-lm", "", (None, 0.25)),
    ("null-lm", "", (None, None)),                         # a backend that keeps none: off, and nothing to say
    ("torch-lm", "prefix_cache = '1GiB'", (1 << 30, None)),
    ("torch-lm", "prefix_cache = '10%'", (None, 0.1)),
    ("torch-lm", "prefix_cache = 0.5", (None, 0.5)),
    ("torch-lm", "prefix_cache = '0'", (None, None)),
    ("torch-lm", "prefix_cache = 0", (None, None)),
    ("torch-lm", "prefix_cache = 0.0", (None, None)),
    ("torch-lm", "prefix_cache = 1048576", (1 << 20, None)),
    ("torch-lm", "prefix_cache = '0%'", (None, None)),
    ("null-lm", "prefix_cache = '0'", (None, None)),       # off is allowed anywhere
])
def test_prefix_cache_takes_a_size_a_fraction_or_zero(backend, keys, expected):
    model = parse(lm(backend, keys)).models[0]
    assert (model.prefix_cache_bytes, model.prefix_cache_fraction) == expected


@pytest.mark.parametrize("backend,keys,message", [
    ("torch-lm", "prefix_cache = 'lots'", r"models\[0\] \(a\)\.prefix_cache: expected a size like '1GiB', a fraction"),
    ("torch-lm", "prefix_cache = '150%'", r"models\[0\] \(a\)\.prefix_cache: a percentage must be from 0% to 100%"),
    ("torch-lm", "prefix_cache = -1", r"models\[0\] \(a\)\.prefix_cache: expected a size"),
    ("torch-lm", "prefix_cache = true", r"models\[0\] \(a\)\.prefix_cache: expected a size"),
    ("torch-lm", "prefix_cache = 1.0", r"models\[0\] \(a\)\.prefix_cache: a fraction must be between 0 and 1"),
    ("torch-lm", "prefix_cache = 1.5", r"models\[0\] \(a\)\.prefix_cache: a fraction must be between 0 and 1"),
    ("null-lm", "prefix_cache = '1GiB'", r"models\[0\] \(a\)\.prefix_cache: applies to backend torch-lm, mlx-lm only"),
    ("torch-lm", "routing = 'random'", r"models\[0\] \(a\)\.routing: must be one of prefix, least-loaded"),
])
def test_bad_prefix_cache_or_routing_fails_at_load_naming_the_key(backend, keys, message):
    with pytest.raises(ConfigError, match=message):
        parse(lm(backend, keys))


def test_routing_defaults_to_the_prefix_with_sglangs_thresholds_and_takes_others():
    config = parse(lm("torch-lm"))
    assert config.models[0].routing == "prefix"
    thresholds = config.daemon.routing
    assert (thresholds.cache_threshold, thresholds.balance_abs_threshold, thresholds.balance_rel_threshold) == \
        (0.5, 32, 1.0001)
    config = parse("[daemon]\nrouting_cache_threshold = 0.8\nrouting_balance_abs_threshold = 4\n"
                   "routing_balance_rel_threshold = 2\n" + lm("torch-lm", "routing = 'least-loaded'"))
    assert config.models[0].routing == "least-loaded"
    assert (config.daemon.routing.cache_threshold, config.daemon.routing.balance_abs_threshold,
            config.daemon.routing.balance_rel_threshold) == (0.8, 4, 2.0)


@pytest.mark.parametrize("key,value,message", [
    ("routing_cache_threshold", "1.5", r"daemon\.routing_cache_threshold: must be a fraction from 0 to 1"),
    ("routing_balance_rel_threshold", "0.5", r"daemon\.routing_balance_rel_threshold: must be 1\.0 or more"),
    ("routing_balance_abs_threshold", "-1", r"daemon\.routing_balance_abs_threshold: must be an integer >= 0"),
    ("routing_cache_threshold", "'half'", r"daemon\.routing_cache_threshold"),
])
def test_bad_routing_thresholds_fail_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse(f"[daemon]\n{key} = {value}\n" + lm("torch-lm"))
