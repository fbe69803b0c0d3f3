"""`mpsctl install` / `mpsctl uninstall`: put mpsd under launchd on macOS.

launchd gives a job no shell, no PATH worth the name and no relative paths,
and a wrong plist fails silently (the job just never starts), so the plist is
rendered from a committed template with this installation's absolute paths
and validated before anything is written. Rendering and validation are pure
functions; everything that touches the machine (files, `launchctl`) goes
through one small `Host` object, so tests record it and `--dry-run` prints it.

Behaviour:

* ``mpsctl install [--agent|--daemon] [--config FILE] [--user NAME] [--dry-run]``
  - ``--agent`` (the default) writes ``~/Library/LaunchAgents/io.mpsd.agent.plist``
    and runs ``launchctl bootstrap gui/$UID PLIST``: the login session is
    where Metal is reliably available. Refused under sudo (root's own
    LaunchAgents would be the wrong ones).
  - ``--daemon`` writes ``/Library/LaunchDaemons/io.mpsd.daemon.plist`` and
    runs ``launchctl bootstrap system PLIST``; needs root. The job runs as
    ``--user`` (default ``$SUDO_USER``, else the current user; never root)
    and that user's primary group. Its state dir is that user's
    ``~/Library/Application Support/mpsd``, the same place the user's own
    ``mpsctl status`` looks, so no ``--state-dir`` is ever needed.
  - ``--config`` must name an existing, valid config file; it is stored as an
    absolute path, and ExitTimeOut is raised above the config's
    drain_grace + stop_timeout if the template's 60 s is not enough. A
    ``daemon.state_dir`` in the config wins over the default state dir.
    Without ``--config`` the job runs the embedded demo default and
    ProgramArguments carries no ``--config`` (the user is told so).
  - Log dir: ``~/Library/Logs/mpsd`` (agent), ``/Library/Logs/mpsd`` (daemon,
    owned by the job's user), created before loading.
  - A plist already in place is booted out first (its job may be loaded),
    then replaced; bootstrap refuses a label that is still loaded.
  - Afterwards the bootout, ``kickstart -k``, ``print`` and the legacy
    ``launchctl load -w`` / ``unload`` spellings are printed.
* ``mpsctl uninstall [--agent|--daemon] [--dry-run]`` runs
  ``launchctl bootout DOMAIN/LABEL`` (a "not loaded" answer is fine) and
  removes the plist. Log files are left for the post-mortem.
* ``--dry-run`` prints the plist it would write, its path, and every command
  it would run, and touches nothing; exit 0.
* Not on macOS (``sys.platform != "darwin"``): launchd does not exist, so
  both commands print where the Linux service files are (systemd unit,
  supervisord program, relative to the checkout) with a one-line how-to
  each, and exit 1 - or 0 with ``--dry-run``, whose whole job is to say what
  would be done. ``MPSD_INSTALL_PLATFORM=darwin`` makes them act as on macOS
  (with ``--dry-run``: print the macOS plist and commands anywhere); any
  other value forces the non-macOS answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import grp
import math
import os
import pathlib
import plistlib
import pwd
import re
import shlex
import subprocess
import sys
from typing import Any, Literal, Protocol
from xml.sax.saxutils import escape

import mpsd

Kind = Literal["agent", "daemon"]

LABELS: dict[str, str] = {"agent": "io.mpsd.agent", "daemon": "io.mpsd.daemon"}
CHECKOUT_ROOT = pathlib.Path(mpsd.__file__).resolve().parents[2]
PLIST_DIR = CHECKOUT_ROOT / "plists"
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PROCESS_TYPES = ("Interactive", "Adaptive", "Standard")
PLACEHOLDER = re.compile(r"@[A-Z_]+@")
# launchctl's answers when the job is simply not loaded: fine for bootout.
NOT_LOADED_CODES = (3, 5, 36, 113)


class PlistError(ValueError):
    """A rendered plist launchd would reject or run wrongly; says which key and why."""


# ---------------------------------------------------------------- rendering

def template_path(kind: Kind) -> pathlib.Path:
    return PLIST_DIR / f"{LABELS[kind]}.plist"


def render_plist(kind: Kind, *, mpsd_bin: str, config: str | None, log_dir: str, state_dir: str,
                 home: str, user: str, group: str, workdir: str, path: str | None = None,
                 exit_timeout: int | None = None, template: bytes | None = None) -> bytes:
    """Fills a template by text so its why-comments survive into the installed file.

    config None drops `--config` from ProgramArguments (the daemon then runs
    its embedded default); exit_timeout, when larger, replaces the template's.
    """
    text = (template if template is not None else template_path(kind).read_bytes()).decode()
    if config is None:
        text = re.sub(r"\s*<string>--config</string>\s*<string>@CONFIG@</string>", "", text)
    if exit_timeout is not None:
        text = _raise_exit_timeout(text, exit_timeout)
    values = {"MPSD_BIN": mpsd_bin, "CONFIG": config or "", "LOG_DIR": log_dir, "STATE_DIR": state_dir,
              "HOME": home, "USER": user, "GROUP": group, "WORKDIR": workdir,
              "PATH": path or f"{pathlib.PurePosixPath(mpsd_bin).parent}:{SYSTEM_PATH}"}
    for name, value in values.items():
        text = text.replace(f"@{name}@", escape(value))
    rendered = text.encode()
    validate_plist(rendered, kind)
    return rendered


def _raise_exit_timeout(text: str, seconds: int) -> str:
    pattern = re.compile(r"(<key>ExitTimeOut</key>\s*<integer>)(\d+)(</integer>)")
    return pattern.sub(lambda m: f"{m[1]}{max(int(m[2]), seconds)}{m[3]}", text)


# --------------------------------------------------------------- validation

def validate_plist(data: bytes, kind: Kind, *, min_exit_timeout: float = 40.0) -> dict[str, Any]:
    """Catches here what launchd would only show as a job that never starts."""
    try:
        plist = plistlib.loads(data)
    except Exception as exc:  # plistlib raises expat and value errors alike
        raise PlistError(f"not a valid plist: {exc}") from None
    if not isinstance(plist, dict):
        raise PlistError("the top level must be a dict")
    leftover = sorted(set(PLACEHOLDER.findall(data.decode(errors="replace"))))
    if leftover:
        raise PlistError(f"placeholders left unfilled: {', '.join(leftover)}")
    _check_types(plist, kind)
    _check_values(plist, kind, min_exit_timeout)
    return plist


def _required_types(kind: Kind) -> dict[str, type]:
    keys: dict[str, type] = {
        "Label": str, "ProgramArguments": list, "RunAtLoad": bool, "KeepAlive": dict,
        "ThrottleInterval": int, "ExitTimeOut": int, "ProcessType": str, "StandardOutPath": str,
        "StandardErrorPath": str, "EnvironmentVariables": dict, "WorkingDirectory": str,
        "SoftResourceLimits": dict,
    }
    if kind == "daemon":
        keys |= {"UserName": str, "GroupName": str}
    return keys


def _check_types(plist: dict[str, Any], kind: Kind) -> None:
    for key, expected in _required_types(kind).items():
        if key not in plist:
            raise PlistError(f"missing key {key}")
        if type(plist[key]) is not expected:  # `is`, because bool is an int
            raise PlistError(f"{key} must be {expected.__name__}, not {type(plist[key]).__name__}")
    args = plist["ProgramArguments"]
    if not args or not all(isinstance(a, str) for a in args):
        raise PlistError("ProgramArguments must be a non-empty list of strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in plist["EnvironmentVariables"].items()):
        raise PlistError("EnvironmentVariables must map strings to strings")
    if type(plist["SoftResourceLimits"].get("NumberOfFiles")) is not int:
        raise PlistError("SoftResourceLimits needs an integer NumberOfFiles")


def _check_values(plist: dict[str, Any], kind: Kind, min_exit_timeout: float) -> None:
    if plist["Label"] != LABELS[kind]:
        raise PlistError(f"Label must be {LABELS[kind]}, not {plist['Label']!r}")
    if not plist["RunAtLoad"]:
        raise PlistError("RunAtLoad must be true: nothing else starts the job")
    if plist["KeepAlive"] != {"SuccessfulExit": False}:
        raise PlistError("KeepAlive must be {SuccessfulExit: false}: restart after crashes, not clean exits")
    if plist["ExitTimeOut"] <= min_exit_timeout:
        raise PlistError(f"ExitTimeOut {plist['ExitTimeOut']}s must exceed drain_grace + stop_timeout "
                         f"({min_exit_timeout:g}s), or launchd SIGKILLs mpsd mid-drain")
    if plist["ThrottleInterval"] < 1:
        raise PlistError("ThrottleInterval must be at least 1 second")
    if plist["ProcessType"] not in PROCESS_TYPES:
        raise PlistError(f"ProcessType {plist['ProcessType']!r} would throttle a latency-sensitive server; "
                         f"use one of {', '.join(PROCESS_TYPES)}")
    _check_environment(plist["EnvironmentVariables"], kind)
    _check_absolute(plist)
    args = plist["ProgramArguments"]
    if not args[0].endswith("/mpsd") or args[1:2] != ["serve"]:
        raise PlistError(f"ProgramArguments must start with .../mpsd serve, not {args[:2]}")


def _check_environment(env: dict[str, str], kind: Kind) -> None:
    needed = ("PATH", "HOME", "MPSD_STATE_DIR") if kind == "agent" else ("PATH", "MPSD_STATE_DIR")
    missing = [name for name in needed if not env.get(name)]
    if missing:
        raise PlistError(f"EnvironmentVariables lacks {', '.join(missing)}")


def _check_absolute(plist: dict[str, Any]) -> None:
    env = plist["EnvironmentVariables"]
    paths = {"ProgramArguments[0]": plist["ProgramArguments"][0], "StandardOutPath": plist["StandardOutPath"],
             "StandardErrorPath": plist["StandardErrorPath"], "WorkingDirectory": plist["WorkingDirectory"],
             "MPSD_STATE_DIR": env["MPSD_STATE_DIR"]}
    if "HOME" in env:
        paths["HOME"] = env["HOME"]
    args = plist["ProgramArguments"]
    if "--config" in args:
        index = args.index("--config")
        paths["--config"] = args[index + 1] if index + 1 < len(args) else ""
    for name, value in paths.items():
        if not value.startswith("/"):
            raise PlistError(f"{name} must be an absolute path (launchd has no working directory to resolve it): {value!r}")


# ------------------------------------------------------------ the machine

class Host(Protocol):
    """Everything install/uninstall does to the machine; tests swap in a recorder."""

    def run(self, argv: list[str]) -> tuple[int, str]: ...
    def write_file(self, path: pathlib.Path, data: bytes) -> None: ...
    def remove_file(self, path: pathlib.Path) -> None: ...
    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None: ...
    def exists(self, path: pathlib.Path) -> bool: ...
    def uid(self) -> int: ...
    def euid(self) -> int: ...


class RealHost:
    def run(self, argv: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            return 127, f"{argv[0]}: not found (launchd exists only on macOS)"
        return done.returncode, (done.stdout + done.stderr).strip()

    def write_file(self, path: pathlib.Path, data: bytes) -> None:
        """Writes beside and renames, so launchd never reads half a plist."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.chmod(partial, 0o644)  # launchd ignores plists writable by others
        os.replace(partial, path)

    def remove_file(self, path: pathlib.Path) -> None:
        path.unlink(missing_ok=True)

    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(path, pwd.getpwnam(owner[0]).pw_uid, grp.getgrnam(owner[1]).gr_gid)

    def exists(self, path: pathlib.Path) -> bool:
        return path.exists()

    def uid(self) -> int:
        return os.getuid()

    def euid(self) -> int:
        return os.geteuid()


class DryRunHost(RealHost):
    """Reads the machine as it is, prints every change instead of making it."""

    def run(self, argv: list[str]) -> tuple[int, str]:
        print(f"would run: {shlex.join(argv)}")
        return 0, ""

    def write_file(self, path: pathlib.Path, data: bytes) -> None:
        print(f"would write {path}:")
        print(data.decode(), end="" if data.endswith(b"\n") else "\n")

    def remove_file(self, path: pathlib.Path) -> None:
        print(f"would remove {path}")

    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None:
        print(f"would create directory {path}" + (f" owned by {owner[0]}:{owner[1]}" if owner else ""))


# ------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Target:
    """Where one kind of job lives and which launchctl domain owns it."""

    kind: Kind
    plist_path: pathlib.Path
    domain: str

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    @property
    def service(self) -> str:
        return f"{self.domain}/{self.label}"


def target_for(kind: Kind, host: Host, home: pathlib.Path) -> Target:
    if kind == "agent":
        return Target(kind, home / "Library" / "LaunchAgents" / f"{LABELS[kind]}.plist", f"gui/{host.uid()}")
    return Target(kind, pathlib.Path("/Library/LaunchDaemons") / f"{LABELS[kind]}.plist", "system")


@dataclasses.dataclass(frozen=True)
class Account:
    user: str
    group: str
    home: pathlib.Path


def account_for(kind: Kind, requested: str | None) -> Account:
    """The agent is always the caller; the daemon runs as a named non-root user."""
    if kind == "agent":
        name = getpass.getuser()
    else:
        name = requested or os.environ.get("SUDO_USER") or getpass.getuser()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InstallError(f"no such user {name!r}") from None
    if kind == "daemon" and entry.pw_uid == 0:
        raise InstallError("the daemon must not run as root: pass --user NAME (the user who runs mpsctl)")
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    home = pathlib.Path.home() if kind == "agent" else pathlib.Path(entry.pw_dir)
    return Account(name, group, home)


class InstallError(Exception):
    """Something the user must fix before installing; the message says what."""


def mpsd_binary() -> pathlib.Path:
    """The `mpsd` script next to this interpreter: the venv's bin, not resolved out of it."""
    return pathlib.Path(sys.executable).absolute().parent / "mpsd"


def config_facts(config: pathlib.Path | None) -> tuple[pathlib.Path | None, float, pathlib.Path | None]:
    """Absolute config path, its drain_grace + stop_timeout, and its state_dir, if any."""
    from mpsd.config import ConfigError, DaemonConfig, load_config

    if config is None:
        defaults = DaemonConfig()
        return None, defaults.drain_grace_s + defaults.stop_timeout_s, None
    config = config.expanduser().absolute()
    if not config.is_file():
        raise InstallError(f"config file {config} does not exist")
    try:
        loaded = load_config(config)
    except ConfigError as exc:
        raise InstallError(str(exc)) from None
    return config, loaded.daemon.drain_grace_s + loaded.daemon.stop_timeout_s, loaded.daemon.state_dir


def plan_plist(kind: Kind, account: Account, config: pathlib.Path | None) -> tuple[bytes, pathlib.Path]:
    """The rendered plist and the log dir it names, for this installation."""
    config_path, drain, config_state = config_facts(config)
    support = account.home / "Library" / "Application Support" / "mpsd"
    state_dir = config_state or support
    log_dir = account.home / "Library" / "Logs" / "mpsd" if kind == "agent" else pathlib.Path("/Library/Logs/mpsd")
    exit_timeout = math.ceil(drain) + 20
    data = render_plist(kind, mpsd_bin=str(mpsd_binary()), config=str(config_path) if config_path else None,
                        log_dir=str(log_dir), state_dir=str(state_dir), home=str(account.home),
                        user=account.user, group=account.group, workdir=str(account.home),
                        exit_timeout=exit_timeout)
    validate_plist(data, kind, min_exit_timeout=drain)
    return data, log_dir


# ------------------------------------------------------------ commands

def install(args: argparse.Namespace, host: Host | None = None) -> int:
    kind = _kind(args)
    if not acts_as_macos():
        return not_macos("install", args.dry_run)
    host = host or (DryRunHost() if args.dry_run else RealHost())
    try:
        _check_privileges(kind, host, args.dry_run)
        account = account_for(kind, getattr(args, "user", None))
        data, log_dir = plan_plist(kind, account, args.config)
    except (InstallError, PlistError) as exc:
        print(f"mpsctl: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, InstallError) else 2
    target = target_for(kind, host, pathlib.Path.home())
    if args.config is None:
        print("note: no --config given: the job will run the embedded demo default (two demo workers)")
    if not host.exists(mpsd_binary()):
        print(f"mpsctl: {mpsd_binary()} does not exist: run mpsctl from the venv mpsd is installed in", file=sys.stderr)
        return 1
    if not host.exists(account.home):
        print(f"mpsctl: {account.user}'s home {account.home} does not exist; launchd could not start the job there",
              file=sys.stderr)
        if not args.dry_run:
            return 1
    return _apply_install(target, data, log_dir, account, host, args.dry_run)


def _apply_install(target: Target, data: bytes, log_dir: pathlib.Path, account: Account, host: Host,
                   dry_run: bool = False) -> int:
    if host.exists(target.plist_path):
        host.run(["launchctl", "bootout", target.service])  # a loaded label cannot be bootstrapped again
    host.make_dir(log_dir, (account.user, account.group) if target.kind == "daemon" else None)
    host.write_file(target.plist_path, data)
    rc, output = host.run(["launchctl", "bootstrap", target.domain, str(target.plist_path)])
    if rc != 0:
        print(f"mpsctl: launchctl bootstrap failed ({rc}): {output}", file=sys.stderr)
        print(f"the plist is in place; see `launchctl print {target.service}` and {log_dir}", file=sys.stderr)
        return 1
    print("dry run: nothing was changed" if dry_run else f"installed {target.plist_path} and loaded it into {target.domain}")
    _print_cheatsheet(target, log_dir)
    return 0


def uninstall(args: argparse.Namespace, host: Host | None = None) -> int:
    kind = _kind(args)
    if not acts_as_macos():
        return not_macos("uninstall", args.dry_run)
    host = host or (DryRunHost() if args.dry_run else RealHost())
    try:
        _check_privileges(kind, host, args.dry_run)
    except InstallError as exc:
        print(f"mpsctl: {exc}", file=sys.stderr)
        return 1
    target = target_for(kind, host, pathlib.Path.home())
    rc, output = host.run(["launchctl", "bootout", target.service])
    if rc not in (0, *NOT_LOADED_CODES):
        print(f"mpsctl: launchctl bootout failed ({rc}): {output}", file=sys.stderr)
        return 1
    present = host.exists(target.plist_path)
    if present:
        host.remove_file(target.plist_path)
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    print(f"{target.service} {'stopped' if rc == 0 else 'was not loaded'}; "
          f"{target.plist_path} {'removed' if present else 'was not there'}")
    return 0


def _kind(args: argparse.Namespace) -> Kind:
    return "daemon" if getattr(args, "daemon", False) else "agent"


def _check_privileges(kind: Kind, host: Host, dry_run: bool) -> None:
    if dry_run:
        return
    if kind == "daemon" and host.euid() != 0:
        raise InstallError("a LaunchDaemon is installed with sudo (it writes /Library/LaunchDaemons)")
    if kind == "agent" and host.euid() == 0:
        raise InstallError("install the agent as the user who logs in, without sudo (or use --daemon)")


def _print_cheatsheet(target: Target, log_dir: pathlib.Path) -> None:
    sudo = "sudo " if target.kind == "daemon" else ""
    path = target.plist_path
    print(f"""
  status:   {sudo}launchctl print {target.service}
  restart:  {sudo}launchctl kickstart -k {target.service}
  stop:     {sudo}launchctl bootout {target.service}
  start:    {sudo}launchctl bootstrap {target.domain} {path}
  legacy:   {sudo}launchctl load -w {path}   /   {sudo}launchctl unload {path}
  logs:     {log_dir}/mpsd.err.log (launchd does not rotate it)
  remove:   {sudo}mpsctl uninstall --{target.kind}""")


# ------------------------------------------------------ not on macOS

def acts_as_macos() -> bool:
    forced = os.environ.get("MPSD_INSTALL_PLATFORM")
    return (forced or sys.platform) == "darwin"


def not_macos(command: str, dry_run: bool) -> int:
    """Points at the Linux service files instead: launchd exists only on macOS."""
    systemd = CHECKOUT_ROOT / "deploy" / "systemd" / "mpsd.service"
    supervisord = CHECKOUT_ROOT / "deploy" / "supervisord" / "mpsd.conf"
    if command == "install":
        how = (f"per user:  systemctl --user link {systemd} && systemctl --user enable --now mpsd",
               f"system:    sudo cp {systemd} /etc/systemd/system/ && sudo systemctl enable --now mpsd",
               f"add  [include] files = {supervisord}  to supervisord.conf, then: supervisorctl update")
    else:
        how = ("per user:  systemctl --user disable --now mpsd",
               "system:    sudo systemctl disable --now mpsd && sudo rm /etc/systemd/system/mpsd.service",
               "remove its [include] line from supervisord.conf, then: supervisorctl update")
    print(f"""mpsctl {command}: launchd is macOS-only; on this system use one of:
  systemd:     {systemd}
               {how[0]}
               {how[1]}
  supervisord: {supervisord}
               {how[2]}""")
    if dry_run:
        return 0
    print(f"mpsctl: {command} did nothing (set MPSD_INSTALL_PLATFORM=darwin with --dry-run to see the macOS plist)",
          file=sys.stderr)
    return 1


def add_subcommands(commands: Any) -> None:
    """Registers install/uninstall on mpsctl's subparsers; all logic stays here."""
    for name, handler, summary in (("install", install, "run mpsd under launchd (macOS)"),
                                   ("uninstall", uninstall, "stop mpsd under launchd and remove its plist")):
        parser = commands.add_parser(name, help=summary)
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--agent", action="store_true", help="per-user LaunchAgent, gui/$UID (default; Metal needs the login session)")
        which.add_argument("--daemon", action="store_true", help="system LaunchDaemon run as --user (needs sudo)")
        parser.add_argument("--dry-run", action="store_true", help="print the plist, its path and the commands; change nothing")
        if name == "install":
            parser.add_argument("--config", type=pathlib.Path, help="config file (default: the embedded demo config)")
            parser.add_argument("--user", help="the daemon's user (default: $SUDO_USER, else you; never root)")
        parser.set_defaults(handler=handler)
