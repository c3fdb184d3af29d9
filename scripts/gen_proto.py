"""Generates the Python stubs (and their .pyi type stubs) from protos/ into a folder.

`make proto` writes them into src/; the drift test writes them into a temporary folder and
compares, so committed stubs can never differ from the proto.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DESCRIPTOR_SET = "credits/v1/credits_descriptor_set.binpb"
PROTO_FILES = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    (out_dir / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    # The mypy-protobuf plugins sit beside this interpreter, which need not be on PATH.
    bin_dir = pathlib.Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        # With comments (source info): reflection serves these, so `grpcurl describe` shows docs.
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src")
