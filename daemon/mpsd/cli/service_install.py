"""`mpsctl install` / `mpsctl uninstall`: put mpsd under launchd on macOS.

launchd shows a wrong plist only as a job that never starts, so the plist is
rendered from a shipped template with this installation's absolute paths and
validated before anything is written (`mpsd.service.plist`, pure). What to
install where is planned in `mpsd.service.plan`; everything that touches the
machine (files, `launchctl`) goes through one small `Host`
(`mpsd.service.host`), so tests record it and `--dry-run` prints it. This
module holds the commands themselves.

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
  supervisord program: ``deploy/`` in a checkout, shipped in a wheel under
  ``mpsd/service/``) with a one-line how-to each, and exit 1 - or 0 with
  ``--dry-run``, whose whole job is to say what would be done.
  ``MPSD_INSTALL_PLATFORM=darwin`` makes them act as on macOS (with
  ``--dry-run``: print the macOS plist and commands anywhere); any other
  value forces the non-macOS answer.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any, Callable

from mpsd.service import shipped
from mpsd.service.host import DryRunHost, Host, RealHost
from mpsd.service.plan import Account, InstallError, Target, account_for, mpsd_binary, plan_plist, target_for
from mpsd.service.plist import Kind, PlistError

# launchctl's answers when the job is simply not loaded: fine for bootout.
NOT_LOADED_CODES = (3, 5, 36, 113)


# ------------------------------------------------------------ commands

def install(args: argparse.Namespace, host: Host | None = None) -> int:
    return _launchd_command("install", args, host, _install)


def uninstall(args: argparse.Namespace, host: Host | None = None) -> int:
    return _launchd_command("uninstall", args, host, _uninstall)


def _launchd_command(command: str, args: argparse.Namespace, host: Host | None,
                     body: Callable[[Kind, argparse.Namespace, Host], int]) -> int:
    """What install and uninstall share before they differ: off macOS, the host, the privileges."""
    if not acts_as_macos():
        return not_macos(command, args.dry_run)
    kind = _kind(args)
    host = host or (DryRunHost() if args.dry_run else RealHost())
    try:
        _check_privileges(kind, host, args.dry_run)
    except InstallError as exc:
        print(f"mpsctl: {exc}", file=sys.stderr)
        return 1
    return body(kind, args, host)


def _install(kind: Kind, args: argparse.Namespace, host: Host) -> int:
    try:
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


def _uninstall(kind: Kind, args: argparse.Namespace, host: Host) -> int:
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
    systemd = shipped("systemd", "mpsd.service")
    supervisord = shipped("supervisord", "mpsd.conf")
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
    """Registers install/uninstall on mpsctl's subparsers; mpsctl itself knows nothing of launchd."""
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
