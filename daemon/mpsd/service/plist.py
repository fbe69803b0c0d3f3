"""launchd plists: rendered from the shipped templates, checked before anything is written.

launchd gives a job no shell, no PATH worth the name and no relative paths,
and shows a wrong plist only as a job that never starts, so every key the
design relies on is checked here, with the reason in the error.
"""

from __future__ import annotations

import pathlib
import plistlib
import re
from typing import Any, Literal
from xml.sax.saxutils import escape

from mpsd.service import shipped

Kind = Literal["agent", "daemon"]

LABELS: dict[str, str] = {"agent": "io.mpsd.agent", "daemon": "io.mpsd.daemon"}
TEMPLATE_DIR = shipped("launchd")
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PROCESS_TYPES = ("Interactive", "Adaptive", "Standard")
PLACEHOLDER = re.compile(r"@[A-Z_]+@")


class PlistError(ValueError):
    """A rendered plist launchd would reject or run wrongly; says which key and why."""


# ---------------------------------------------------------------- rendering

def template_path(kind: Kind) -> pathlib.Path:
    return TEMPLATE_DIR / f"{LABELS[kind]}.plist"


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
