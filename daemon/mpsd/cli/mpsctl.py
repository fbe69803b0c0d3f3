"""`mpsctl`: the operator's client. Status over the admin socket; generate and chat over the public API."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time

import grpc

from mpsd import paths
from mpsd.cli.status_format import format_status, format_worker, render_status
from mpsd.client import DEFAULT_ADDRESS, Client, MpsdError
from mpsd.proto_plain import to_plain
from mpsd.v1 import admin_pb2, admin_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except grpc.RpcError as exc:
        print(f"mpsctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except DaemonUnreachable as exc:
        print(f"mpsctl: {exc}", file=sys.stderr)
        return 1
    except MpsdError as exc:
        print(f"mpsctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unreadable --token-file or --tls-ca
        print(f"mpsctl: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpsctl", description="operate a running mpsd")
    parser.add_argument("--state-dir", type=pathlib.Path, help="the daemon's state directory (default: $MPSD_STATE_DIR or the platform's)")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="daemon, models, memory and workers")
    status.add_argument("worker", nargs="?", help="show one worker in full")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                        help="refresh in place every SECONDS (default 1) until Ctrl-C")
    status.add_argument("--count", type=int, default=0, help="with --watch: stop after this many refreshes")
    status.set_defaults(handler=_status)
    logs = commands.add_parser("logs", help="a worker's recent stderr; --follow for new lines as they come")
    logs.add_argument("worker")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many recent lines (0: all the daemon kept)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines, across restarts, until Ctrl-C")
    logs.set_defaults(handler=_logs)
    generate = commands.add_parser("generate", help="stream generated text to the terminal")
    generate.add_argument("prompt")
    _add_generation_options(generate)
    generate.set_defaults(handler=_generate)
    chat = commands.add_parser("chat", help="a conversation with a model on a terminal; one reply when piped")
    chat.add_argument("message", nargs="?", help="send this one message and print the reply (default: a "
                      "conversation on a terminal, or all of stdin as one message when it is piped)")
    chat.add_argument("--system", help="a system message that opens the conversation")
    _add_generation_options(chat)
    chat.set_defaults(handler=_chat)
    scale = commands.add_parser("scale", help="set a model's replica count")
    scale.add_argument("model")
    scale.add_argument("replicas", type=int)
    scale.add_argument("--min", type=int, dest="min_replicas", help="demand: the fewest workers kept, even idle")
    scale.add_argument("--max", type=int, dest="max_replicas", help="demand: the most started when requests wait")
    scale.set_defaults(handler=_scale)
    restart = commands.add_parser("restart", help="drain a worker and start a fresh one (or retry a FATAL/REFUSED/OOM one)")
    restart.add_argument("worker")
    restart.set_defaults(handler=lambda args: _control(args, "RestartWorker", admin_pb2.WorkerRequest(worker_id=args.worker)))
    drain = commands.add_parser("drain", help="finish a worker's requests in flight, then stop it")
    drain.add_argument("worker")
    drain.set_defaults(handler=lambda args: _control(args, "DrainWorker", admin_pb2.WorkerRequest(worker_id=args.worker)))
    reload = commands.add_parser("reload", help="re-read the config file and apply what changed")
    reload.set_defaults(handler=lambda args: _control(args, "Reload", admin_pb2.ReloadRequest()))
    wait = commands.add_parser("wait", help="wait until every configured worker is READY")
    wait.add_argument("--timeout", type=float, default=300.0)
    wait.set_defaults(handler=_wait)
    from mpsd.cli import service_install  # install/uninstall live there, all of them
    service_install.add_subcommands(commands)
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="model name (default: the only model)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument("--address", help="public API HOST:PORT, or several as A,B,C (balanced: docs/multi-host.md) "
                                           "(default: $MPSD_ADDRESS, else asked of the daemon)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (each reply, in a chat)")
    parser.add_argument("--tls-ca", type=pathlib.Path, default=os.environ.get("MPSD_TLS_CA"),
                        help="CA certificate (PEM) to reach a daemon serving TLS (default: $MPSD_TLS_CA)")
    parser.add_argument("--token-file", type=pathlib.Path, default=os.environ.get("MPSD_TOKEN_FILE"),
                        help="file holding the bearer token the daemon requires (default: $MPSD_TOKEN_FILE)")


def _admin_stub(args) -> admin_pb2_grpc.AdminStub:
    state_dir = args.state_dir or paths.default_state_dir()
    channel = grpc.insecure_channel(f"unix:{paths.admin_socket_path(state_dir)}")
    return admin_pb2_grpc.AdminStub(channel)


class DaemonUnreachable(Exception):
    pass


def _unreachable(args) -> DaemonUnreachable:
    socket_path = paths.admin_socket_path(args.state_dir or paths.default_state_dir())
    return DaemonUnreachable(f"no mpsd answers on {socket_path}: is it running, with this --state-dir?")


def _fetch_status(args, timeout: float = 5.0) -> dict:
    try:
        return to_plain(_admin_stub(args).Status(admin_pb2.StatusRequest(), timeout=timeout))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        raise _unreachable(args) from None


def _status(args) -> int:
    if args.worker:
        return _one_worker(args, _fetch_status(args))
    if args.watch:
        return _watch(args)
    status = _fetch_status(args)
    if args.json:
        print(json.dumps(status, indent=2))
    elif sys.stdout.isatty():
        from rich.console import Console

        Console().print(render_status(status))
    else:
        print(format_status(status))
    return 0


def _one_worker(args, status: dict) -> int:
    worker = next((w for w in status["workers"] if w["id"] == args.worker), None)
    if worker is None:
        print(f"mpsctl: no worker {args.worker!r}; workers: {', '.join(w['id'] for w in status['workers'])}", file=sys.stderr)
        return 1
    print(json.dumps(worker, indent=2) if args.json else format_worker(worker))
    return 0


def _watch(args) -> int:
    """Redraws in place on a terminal; into a pipe, prints one snapshot per refresh (JSON lines with --json)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    refreshes = 0
    with Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else contextlib.nullcontext() as live:
        while not args.count or refreshes < args.count:
            status = _fetch_status(args)
            if live is not None:
                live.update(render_status(status), refresh=True)
            else:
                print(json.dumps(status) if args.json else format_status(status) + "\n", flush=True)
            refreshes += 1
            if refreshes != args.count:
                time.sleep(args.watch)
    return 0


def _logs(args) -> int:
    request = admin_pb2.WorkerLogsRequest(worker_id=args.worker, lines=max(args.lines, 0), follow=args.follow)
    try:
        for line in _admin_stub(args).WorkerLogs(request, timeout=None if args.follow else 30):
            print(line.text, flush=True)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        raise _unreachable(args) from None
    return 0


def _scale(args) -> int:
    counts = {"replicas": args.replicas, "min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    negative = [name for name, value in counts.items() if value is not None and value < 0]
    if negative:
        print(f"mpsctl: {negative[0]} must be 0 or more", file=sys.stderr)
        return 2
    return _control(args, "Scale", admin_pb2.ScaleRequest(
        model=args.model, **{name: value for name, value in counts.items() if value is not None}))


def _control(args, method: str, request) -> int:
    try:
        reply = getattr(_admin_stub(args), method)(request, timeout=60)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        raise _unreachable(args) from None
    print(reply.message if reply.ok else f"mpsctl: {reply.message}", file=sys.stdout if reply.ok else sys.stderr)
    return 0 if reply.ok else 1


def _wait(args) -> int:
    deadline = time.monotonic() + args.timeout
    last = "daemon not answering yet"
    while time.monotonic() < deadline:
        try:
            workers = _fetch_status(args, timeout=2.0)["workers"]
        except (grpc.RpcError, DaemonUnreachable) as exc:
            last = str(exc)
        else:
            states = {w["id"]: w["state"] for w in workers if w["state"] != "STOPPED"}
            if all(s == "READY" for s in states.values()):
                print("all workers READY: " + ", ".join(states))
                return 0
            fatal = [w for w in workers if w["state"] == "FATAL"]
            if fatal:
                print(f"mpsctl: worker {fatal[0]['id']} is FATAL: {fatal[0]['reason']}", file=sys.stderr)
                return 1
            last = ", ".join(f"{k} {v}" for k, v in states.items())
        time.sleep(0.25)
    print(f"mpsctl: timed out after {args.timeout:g}s; last seen: {last}", file=sys.stderr)
    return 1


def _public_address(args) -> str:
    if args.address or os.environ.get("MPSD_ADDRESS"):
        return args.address or os.environ["MPSD_ADDRESS"]
    try:
        return _fetch_status(args, timeout=2.0)["daemon"]["listen"] or DEFAULT_ADDRESS
    except (grpc.RpcError, DaemonUnreachable):
        return DEFAULT_ADDRESS


def _client(args) -> Client:
    token = args.token_file.read_text().strip() if args.token_file else None
    return Client(_public_address(args), tls_ca=args.tls_ca, token=token)


def _options(args) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "stop": tuple(args.stop)}


def _chat(args) -> int:
    from mpsd.cli.chat import run_chat

    with _client(args) as client:
        return run_chat(client, args.model, args.system, args.message, _options(args), args.timeout)


def _generate(args) -> int:
    with _client(args) as client:
        stream = client.generate(args.prompt, args.model, timeout=args.timeout, **_options(args))
        for token_piece in stream:
            sys.stdout.write(token_piece.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        finish = stream.finish
        print(f"[{finish.reason}: {finish.prompt_tokens} prompt + {finish.completion_tokens} generated tokens, "
              f"worker {finish.worker_id} pid {finish.worker_pid}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
