"""tools/wheelhouse.py: a wheelhouse built for this interpreter installs megatron-sft offline (slow: it
resolves and downloads ~60 wheels from the package registry)."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import wheelhouse  # noqa: E402


def test_torch_stub_is_an_empty_torch_distribution(tmp_path):
    wheelhouse._torch_stub(tmp_path, "2.13.0")
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name == "torch-2.13.0+stub-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("torch-2.13.0+stub.dist-info/METADATA").decode()
        assert not [n for n in archive.namelist() if not n.startswith("torch-2.13.0+stub.dist-info/")]
    assert "Name: torch\n" in metadata and "Requires-Dist" not in metadata


@pytest.mark.slow
def test_wheelhouse_installs_megatron_sft_without_an_index(tmp_path):
    house = tmp_path / "wheelhouse"
    assert wheelhouse.main(["--out", str(house)]) == 0
    names = {w.name.split("-")[0].lower() for w in house.glob("*.whl")}
    assert {"megatron_sft", "megatron_core", "transformers", "datasets"} <= names
    assert not {n for n in names if n == "torch" or n.startswith(("nvidia", "triton"))}
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = str(env / "bin" / "python")
    # torch as the target has it (installed from the registry, as a cluster has its own build) ...
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    # ... and everything else from the wheelhouse alone
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(house), "megatron-sft"],
                   check=True)
    out = subprocess.run([str(env / "bin" / "megatron-sft"), "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "convert" in out.stdout
