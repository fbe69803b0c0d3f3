"""`mpsd serve`: run the daemon in the foreground. `mpsd build-demo`: build the demo models."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import sys

from mpsd import __version__, paths
from mpsd.cli.logs import setup_logging
from mpsd.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpsd", description="model process supervisor daemon")
    parser.add_argument("--version", action="version", version=f"mpsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", type=pathlib.Path, help="TOML config file (default: the embedded demo config)")
    serve.add_argument("--listen", help="public API address HOST:PORT (default from config: 127.0.0.1:7700)")
    serve.add_argument("--http-listen", metavar="HOST:PORT",
                       help='the HTTP edge: /v1 (OpenAI-compatible API), /metrics and the status page (default from '
                            'config: 127.0.0.1:7702; "" serves none)')
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help='the same HTTP edge on one more address, for scrape configs that name it (default from '
                            'config: none)')
    serve.add_argument("--log-format", choices=("text", "json"), help="one line per event as text or JSON (default from config: text)")
    serve.add_argument("--state-dir", type=pathlib.Path, help="where the admin socket lives (default: $MPSD_STATE_DIR or the platform's)")
    serve.add_argument("--data-dir", type=pathlib.Path, help="where the demo model is built (default: $MPSD_DATA_DIR or the platform's)")
    build = commands.add_parser("build-demo", help="build the demo model now (it is built on first use otherwise)")
    build.add_argument("--data-dir", type=pathlib.Path)
    build.add_argument("--mlx", action="store_true", help="also build the MLX demo model (needs the mlx extra)")
    build.add_argument("--gguf", action="store_true",
                       help="also build the GGUF demo model: the demo model converted by llama.cpp's converter (the "
                            "first build fetches llama-cpp-python's sdist for it)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _build_demo(args)


def _serve(args: argparse.Namespace) -> int:
    from mpsd.supervisor.daemon import Daemon, DaemonError
    from mpsd.supervisor.demo_build import DemoBuildFailed
    from mpsd.supervisor.listeners import ListenError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mpsd: {exc}", file=sys.stderr)
        return 2
    daemon_config = config.daemon
    setup_logging(args.log_format or daemon_config.log_format, daemon_config.log_file, daemon_config.log_max_bytes, daemon_config.log_backups)
    state_dir = args.state_dir or config.daemon.state_dir or paths.default_state_dir()
    metrics_listen = config.daemon.metrics_listen if args.metrics_listen is None else args.metrics_listen
    http_listen = config.daemon.http_listen if args.http_listen is None else args.http_listen
    daemon = Daemon(config, state_dir, args.listen or config.daemon.listen, args.data_dir or paths.default_data_dir(),
                    metrics_listen, http_listen)
    try:
        return asyncio.run(daemon.run())
    except (DaemonError, ListenError, DemoBuildFailed, ValueError, OSError) as exc:
        logging.getLogger("mpsd").error("cannot serve: %s", exc)
        return 1


def _build_demo(args: argparse.Namespace) -> int:
    from mpsd.demo import GGUF_DEMO, MLX_DEMO, TORCH_DEMO, DemoModelError
    from mpsd.supervisor.demo_build import DemoBuildFailed, ensure_demos
    from mpsd.supervisor.fleet.worker_env import worker_env

    setup_logging("text")
    config = load_config(None)
    data_dir = args.data_dir or paths.default_data_dir()
    demos = [TORCH_DEMO] + ([MLX_DEMO] if args.mlx else [])
    try:
        asyncio.run(ensure_demos([demo.ref for demo in demos], data_dir, worker_env(config.models[0])))
    except DemoBuildFailed as exc:
        print(f"mpsd: {exc}", file=sys.stderr)
        return 1
    if args.gguf:
        # In this process: the builder imports neither torch nor transformers (its converter runs in a child).
        from mpsd.demo.gguf_model import build_gguf_demo_model

        log = logging.getLogger("mpsd.demo")
        try:
            build_gguf_demo_model(GGUF_DEMO.model_dir(data_dir), source_dir=TORCH_DEMO.model_dir(data_dir),
                                  cache_dir=paths.cache_dir(data_dir),
                                  progress=lambda line: log.info("%s build | %s", GGUF_DEMO.label, line))
        except DemoModelError as exc:
            print(f"mpsd: building the {GGUF_DEMO.label} failed: {exc}", file=sys.stderr)
            return 1
        demos.append(GGUF_DEMO)
    for demo in demos:
        print(f"{demo.label} ready in {demo.served_path(data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
