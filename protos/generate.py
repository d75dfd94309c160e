"""Regenerate (or, with --check, verify) the Python code generated from protos/ (into src/task_runner/v1).

The generated modules are committed so that `pip install .` needs no code generator.
`python protos/generate.py --check` regenerates into a scratch folder and fails if the
result differs from what is committed, so the generated code cannot silently go stale.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
OUT = PROTOS.parent / "src"  # protoc writes task_runner/v1/*_pb2*.py* under it, as the .proto files' paths say
SOURCES = sorted(PROTOS.glob("task_runner/**/*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into `out`."""
    import grpc_tools

    scripts = Path(sysconfig.get_path("scripts"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTOS}", f"-I{include}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        f"--mypy_out={out}", f"--mypy_grpc_out={out}",
        *map(str, SOURCES),
    ]
    subprocess.run(cmd, check=True)


def generated(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.name.endswith(SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if regeneration changes anything")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        stale = [str(p) for p in generated(fresh) if not (OUT / p).exists()
                 or not filecmp.cmp(fresh / p, OUT / p, shallow=False)]
        stale += [str(p) for p in generated(OUT) if not (fresh / p).exists()]
        if stale:
            print("generated code is stale, run `python protos/generate.py`:", *stale, sep="\n  ")
            return 1
    print(f"generated code is up to date ({len(generated(OUT))} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
