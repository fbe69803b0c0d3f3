"""backend = "engine" keys (config/engines.py and the engine part of config/models.py) through the real loader."""

import pathlib
import re
import sys

import pytest

from mpsd.backends import ENGINE_CONCURRENCY
from mpsd.config import ConfigError, parse_config
from mpsd.config import engines
from mpsd.config.engines import BOOT_ALLOWANCE_S, fill_command, llama_cpp_command
from mpsd.config.schema import DEFAULT_START_TIMEOUT_S

CFG = pathlib.Path("/cfg")
DS4 = '["ds4-server", "--model", "{path}", "--port", "{port}", "--cache", "{state}/kv", "--id", "r{replica}"]'


def parse(text: str):
    return parse_config(text, source="test.toml", base_dir=CFG)


def engine_model(keys: str, *, backend: str | None = "engine", command: str | None = '["srv", "--port", "{port}"]',
                 path: str | None = None):
    lines = ["[[models]]", "name = 'e'"]
    lines += [f"backend = '{backend}'"] if backend else []
    lines += [f"path = '{path}'"] if path else []
    lines += [f"command = {command}"] if command else []
    return parse("\n".join(lines + [keys]) + "\n").models[0]


def refused(keys: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        engine_model(keys, **kwargs)
    return str(caught.value)


# -- good forms ---------------------------------------------------------------------------------------------------

def test_a_ds4_server_like_command_with_all_four_placeholders_and_the_defaults():
    model = engine_model("", command=DS4, path="models/ds4.bin")
    assert model.backend == "engine" and model.path == str(CFG / "models/ds4.bin")
    engine = model.engine
    assert engine.command == ("ds4-server", "--model", "{path}", "--port", "{port}", "--cache", "{state}/kv",
                              "--id", "r{replica}"), "kept as written: the worker fills it per replica"
    assert (engine.health, engine.api, engine.start_timeout_s, engine.concurrency) == ("", "openai", 300.0, None)
    assert DEFAULT_START_TIMEOUT_S == 300.0
    assert model.load_timeout_s == 300.0 + BOOT_ALLOWANCE_S == 330.0
    assert model.concurrency == ENGINE_CONCURRENCY == 8, "a command of one's own: the engine backend's default"
    assert model.prefix_cache_fraction is None and model.prefix_cache_bytes is None, "an engine keeps no mpsd cache"


def test_health_api_and_start_timeout_given():
    model = engine_model("health = '/v1/health'\napi = 'openai'\nstart_timeout = '90s'")
    assert (model.engine.health, model.engine.api, model.engine.start_timeout_s) == ("/v1/health", "openai", 90.0)
    assert model.load_timeout_s == 90.0 + BOOT_ALLOWANCE_S, "load_timeout follows start_timeout by default"


def test_load_timeout_may_be_given_equal_to_or_above_start_timeout():
    assert engine_model("start_timeout = '90s'\nload_timeout = '90s'").load_timeout_s == 90.0
    assert engine_model("start_timeout = 10\nload_timeout = '2m'").load_timeout_s == 120.0
    assert engine_model("load_timeout = '5m'").load_timeout_s == 300.0, "the default start_timeout itself"


def test_other_backends_keep_the_300s_load_timeout_and_no_engine():
    model = parse("[[models]]\nname='a'\nbackend='null-lm'\n").models[0]
    assert model.engine is None and model.load_timeout_s == 300.0


def test_a_command_may_pass_other_braces_through_as_they_are():
    """A JSON argument (llama-server --chat-template-kwargs, mlx_lm.server --chat-template-args) is no placeholder."""
    command = '["llama-server", "--port", "{port}", "--chat-template-kwargs", \'{"enable_thinking": false}\']'
    model = engine_model("", command=command)
    assert model.engine.command[-1] == '{"enable_thinking": false}'
    assert fill_command(model.engine.command, port=1, path=None, state="s", replica=0)[-1] == \
        '{"enable_thinking": false}'


# -- refusals, each naming its key ------------------------------------------------------------------------------

AT = r"test.toml: models\[0\] \(e\)\."


@pytest.mark.parametrize("keys, kwargs, message", [
    ("", dict(command="'srv --port {port}'"), AT + r"command: must be a non-empty array of strings, like "
                                              r"\[\"llama-server\", \"--port\", \"\{port\}\"\], got 'srv --port \{port\}'"),
    ("", dict(command="[]"), AT + r"command: must be a non-empty array of strings.*, got \[\]"),
    ("", dict(command='["srv", "--port", 8080]'), AT + r"command: must be a non-empty array of strings.*got \['srv', "
                                                  r"'--port', 8080\]"),
    ("", dict(command='[" ", "--port", "{port}"]'), AT + r"command\[0\]: the program must not be empty"),
    ("", dict(command='["srv", "--port", "{prot}"]'), AT + r"command\[2\]: unknown placeholder \{prot\} in "
                                                      r"'\{prot\}' \(known: \{port\}, \{path\}, \{state\}, \{replica\}\)"),
    ("", dict(command='["srv", "--port", "8080"]'), AT + r"command: must pass \{port\} to the engine: each replica "
                                                    r"listens on a port mpsd picks for it"),
    ("", dict(command='["srv", "--port", "{port}", "-m", "{path}"]'), AT + r"command: uses \{path\} but the model "
                                                                      r"has no path"),
    ("health = 'health'", {}, AT + r"health: must be an HTTP path starting with '/', like '/health', got 'health'"),
    ("health = 200", {}, AT + r"health: must be a string, got 200"),
    ("api = 'anthropic'", {}, AT + r"api: must be one of openai, got 'anthropic'"),
    ("start_timeout = 0", {}, AT + r"start_timeout: must be more than 0, got 0"),
    ("start_timeout = '0s'", {}, AT + r"start_timeout: must be more than 0, got '0s'"),
    ("start_timeout = 'soon'", {}, AT + r"start_timeout: expected a duration like '30s'"),
    ("start_timeout = '90s'\nload_timeout = '60s'", {},
     AT + r"load_timeout: 60s is below start_timeout 90s: the daemon would kill the worker while it still waits "
          r"for its engine"),
    ("", dict(command=None), AT + r"command: backend engine needs command = \[\"server\", \"--port\", \"\{port\}\", "
                                  r"\.\.\.\]"),
    ("", dict(command=None, path="model.bin"), AT + r"command: backend engine needs command"),
    ("commands = ['srv']", {}, r"test.toml: models\[0\]\.commands: unknown key"),
])
def test_a_bad_engine_key_is_refused_naming_it(keys, kwargs, message):
    assert re.search(message, refused(keys, **kwargs))


@pytest.mark.parametrize("key", ["command = ['srv', '--port', '{port}']", "health = '/health'", "api = 'openai'",
                                 "start_timeout = '90s'"])
def test_an_engine_key_on_another_backend_is_refused(key):
    with pytest.raises(ConfigError, match=r"test.toml: models\[0\] \(a\)\.(command|health|api|start_timeout): "
                                          r"applies to backend engine only"):
        parse(f"[[models]]\nname='a'\nbackend='torch-lm'\npath='m'\n{key}\n")


# -- GGUF: a path with no backend is llama.cpp ----------------------------------------------------------------------

def found(path: str | None):
    return lambda name: path if name == "llama-server" else None


def test_llama_cpp_command_prefers_llama_server_on_path():
    command, concurrency = llama_cpp_command(which=found("/opt/bin/llama-server"), python="/py")
    assert command == ("/opt/bin/llama-server", "--model", "{path}", "--host", "127.0.0.1", "--port", "{port}",
                       "--parallel", "4")
    assert concurrency == 4


def test_llama_cpp_command_falls_back_to_llama_cpp_python_one_request_at_a_time():
    command, concurrency = llama_cpp_command(which=found(None), python="/py")
    assert command == ("/py", "-m", "llama_cpp.server", "--model", "{path}", "--host", "127.0.0.1", "--port", "{port}",
                       "--interrupt_requests", "False")
    assert concurrency == 1
    assert llama_cpp_command(which=found(None))[0][0] == sys.executable, "the daemon's own Python by default"


@pytest.fixture
def which(monkeypatch):
    """Makes the loader's llama_cpp_command see (or not see) llama-server."""
    def use(path: str | None) -> None:
        monkeypatch.setattr(engines, "llama_cpp_command", lambda: llama_cpp_command(which=found(path), python="/py"))
    return use


@pytest.mark.parametrize("server, program, concurrency", [
    ("/opt/bin/llama-server", "/opt/bin/llama-server", 4),
    (None, "/py", 1),
])
def test_a_gguf_path_with_no_backend_is_an_engine_running_llama_cpp(which, server, program, concurrency):
    which(server)
    model = engine_model("", backend=None, command=None, path="models/Qwen3-8B-Q4_K_M.GGUF")
    assert model.backend == "engine" and model.path == str(CFG / "models/Qwen3-8B-Q4_K_M.GGUF")
    assert model.engine.command[0] == program and "{path}" in model.engine.command and "{port}" in model.engine.command
    assert model.engine.concurrency == concurrency and model.concurrency == concurrency, \
        "the model's default concurrency follows the server llama.cpp runs as"
    assert (model.engine.health, model.engine.start_timeout_s, model.load_timeout_s) == ("", 300.0, 330.0)


def test_the_gguf_demo_is_llama_cpp_too_and_concurrency_given_wins(which):
    which("/opt/bin/llama-server")
    model = engine_model("concurrency = 2", backend=None, command=None, path="@gguf-demo")
    assert (model.backend, model.path, model.engine.command[0]) == ("engine", "@gguf-demo", "/opt/bin/llama-server")
    assert model.concurrency == 2


def test_a_gguf_path_with_a_command_of_its_own_runs_that(which):
    which("/opt/bin/llama-server")
    model = engine_model("", backend=None, command='["my-server", "-m", "{path}", "--port", "{port}"]', path="m.gguf")
    assert model.engine.command[0] == "my-server" and model.concurrency == ENGINE_CONCURRENCY


def test_a_path_that_is_not_gguf_with_no_backend_still_needs_a_backend():
    with pytest.raises(ConfigError, match=r"models\[0\] \(e\)\.backend: must be one of .*got None"):
        engine_model("", backend=None, command=None, path="model.bin")


# -- fill_command ---------------------------------------------------------------------------------------------------

def test_fill_command_fills_each_placeholder_and_leaves_other_braces_alone():
    command = ("ds4-server", "--model", "{path}", "--port", "{port}", "--cache", "{state}/kv-{replica}",
               "--id", "r{replica}", "--json", '{"a": {"b": 1}}', "{other}", "{}", "{{port}}")
    assert fill_command(command, port=8123, path="/m/x.gguf", state="/var/run/mpsd/e-1", replica=2) == [
        "ds4-server", "--model", "/m/x.gguf", "--port", "8123", "--cache", "/var/run/mpsd/e-1/kv-2",
        "--id", "r2", "--json", '{"a": {"b": 1}}', "{other}", "{}", "{8123}"]


def test_fill_command_without_a_path_fills_it_empty():
    assert fill_command(("srv", "--port", "{port}", "{path}"), port=1, path=None, state="", replica=0) == \
        ["srv", "--port", "1", ""]
