"""Where a launchd job goes, whom it runs as, and the plist that says so, for this installation.

Everything here reads the machine (users, the config file, the interpreter)
but changes nothing; the commands apply the plan through a `Host`.
"""

from __future__ import annotations

import dataclasses
import getpass
import grp
import math
import os
import pathlib
import pwd
import sys

from mpsd.service.host import Host
from mpsd.service.plist import LABELS, Kind, render_plist, validate_plist


class InstallError(Exception):
    """Something the user must fix before installing; the message says what."""


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
    """The user a job runs as, with the group and home launchd is told."""

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
