"""Write a directory of wheels that installs megatron-sft on an offline machine which already has torch.

    python tools/wheelhouse.py --out wheelhouse --python-version 3.12 --extras eval
    # on the compute node (torch already installed, no internet):
    pip install --no-index --find-links wheelhouse "megatron-sft[eval]"

Why: compute nodes of many clusters have no internet, and torch there is the site's own CUDA build, which a
resolver must neither replace nor download again (several GiB of CUDA libraries). The installed torch is
therefore stood in for by an empty stub wheel ``torch==<--torch>+stub`` while pip resolves the rest for the
target Python and platform (``pip install --dry-run --report``); every resolved distribution except torch
is then downloaded as a wheel (``pip download --no-deps --only-binary=:all:``), and those published only as
source are built into wheels here (pure-Python ones build anywhere). The project's own wheel comes from
this checkout. Nothing is installed on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the target's torch installation already brings (its CUDA build pins these itself)
SKIPPED = ("torch", "triton", "nvidia-", "cuda-", "pytorch-triton")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _torch_stub(directory: Path, version: str) -> None:
    """An empty ``torch`` wheel with no dependencies: the target's installed torch, for the resolver only."""
    name = f"torch-{version}+stub"
    with zipfile.ZipFile(directory / f"{name}-py3-none-any.whl", "w") as wheel:
        info = f"{name}.dist-info"
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}+stub\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: wheelhouse\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def _target_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--python-version", args.python_version, "--only-binary=:all:"]
    for platform in args.platform:
        flags += ["--platform", platform]
    return flags


def _resolve(args: argparse.Namespace, project_wheel: Path, scratch: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution the target needs, resolved for its Python and platform."""
    stubs = scratch / "stubs"
    stubs.mkdir()
    _torch_stub(stubs, args.torch)
    report = scratch / "report.json"
    extras = f"[{args.extras}]" if args.extras else ""
    constraints = ["-c", str(args.constraints)] if args.constraints else []
    _pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
         "--target", str(scratch / "target"), "--find-links", str(stubs), *_target_flags(args), *constraints,
         f"torch=={args.torch}+stub", f"megatron-sft{extras} @ {project_wheel.as_uri()}")
    items = json.loads(report.read_text())["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in items]


def _download(args: argparse.Namespace, name: str, version: str) -> None:
    """The wheel for the target; a source-only release is built into a wheel here instead."""
    try:
        _pip("download", "--quiet", "--no-deps", "--dest", str(args.out), *_target_flags(args), f"{name}=={version}")
    except subprocess.CalledProcessError:
        print(f"{name}=={version}: no wheel for the target; building one from its source release", flush=True)
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(args.out), f"{name}=={version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory the wheels are written to")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the target's Python, e.g. 3.12 (default: this interpreter's)")
    parser.add_argument("--platform", action="append", default=None,
                        help="target platform tag(s), repeatable (default: manylinux_2_28_x86_64 and "
                             "manylinux2014_x86_64)")
    parser.add_argument("--extras", default="", help="megatron-sft extras to include, e.g. eval or eval,wandb")
    parser.add_argument("--torch", default="2.13.0", help="the torch version installed on the target")
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt",
                        help="pins to resolve with (default: the project's constraints.txt; '' for none)")
    args = parser.parse_args(argv)
    args.platform = args.platform or ["manylinux_2_28_x86_64", "manylinux2014_x86_64"]
    args.constraints = args.constraints if str(args.constraints) not in ("", ".") else None
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse_") as scratch_dir:
        scratch = Path(scratch_dir)
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(args.out), str(ROOT))
        project_wheel = next(args.out.glob("megatron_sft-*.whl"))
        resolved = _resolve(args, project_wheel, scratch)
    wanted = [(n, v) for n, v in resolved if n != "megatron-sft" and not n.lower().startswith(SKIPPED)]
    for name, version in wanted:
        _download(args, name, version)
    print(f"{len(wanted) + 1} wheels in {args.out} for Python {args.python_version} on {', '.join(args.platform)} "
          f"(torch {args.torch} expected installed). Install offline with:\n"
          f"  pip install --no-index --find-links {args.out} 'megatron-sft{f'[{args.extras}]' if args.extras else ''}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
