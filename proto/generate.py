"""Regenerates the committed Python code for proto/mpsd/v1/*.proto.

Run it after editing a .proto file: `python proto/generate.py`. The test
tests/unit/test_proto_generated.py runs the same function into a temporary
directory and fails if the committed files differ, so the contract and the
code cannot drift apart.
"""

from __future__ import annotations

import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE_ROOT = PROTO_ROOT.parent / "daemon"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "mpsd" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # build-time tool, never imported at run time

    relative = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *relative,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))


if __name__ == "__main__":
    generate(PACKAGE_ROOT)
    sys.exit(0)
