"""`megatron-sft continuum` end to end at small sizes (slow: spawned training runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _continuum(out, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "megatron_sft", "continuum", "--out", str(out), "--epochs", "1",
                           "--train-rows", "64", "--base-steps", "150", *args],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_continuum_miniature_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "continuum"
    _continuum(out, "--objectives", "nll,neg_p")
    cells = json.loads((out / "continuum.json").read_text())["cells"]
    assert [(c["task"].split()[0], c["objective"], c["seed"]) for c in cells] == [
        ("prior", "nll", 0), ("prior", "neg_p", 0), ("novel", "nll", 0), ("novel", "neg_p", 0)]
    prior, novel = cells[0]["base_mean_p"], cells[2]["base_mean_p"]
    assert prior > novel  # pre-training on the prior task gives it the stronger prior
    assert len({c["steps"] for c in cells}) == 1 and cells[0]["steps"] >= 1  # same data size for every run
    table = (out / "continuum.md").read_text()
    assert len(table.splitlines()) == 4 and "| prior (shift by one) | 1 |" in table and "± n/a" in table
    assert (out / "continuum.png").stat().st_size > 10_000


@pytest.mark.slow
def test_continuum_alpha_sweep_over_three_seeds(tmp_path):
    out = tmp_path / "sweep"
    _continuum(out, "--seeds", "3", "--alphas", "1,10")
    data = json.loads((out / "continuum.json").read_text())
    assert data["settings"]["objectives"] == ["nll", "family:1", "family:10"] and data["settings"]["seeds"] == 3
    assert len(data["cells"]) == 3 * 2 * 3 and sorted({c["seed"] for c in data["cells"]}) == [0, 1, 2]
    assert len({c["base_mean_p"] for c in data["cells"]}) == 6  # each seed has its own base model (2 tasks x 3)
    assert all(s["n"] == 3 and s["exact_match"]["half_width"] is not None for s in data["summary"])
    lines = (out / "continuum.md").read_text().splitlines()
    assert len(lines) == 4 and "95% t-interval" in lines[0] and "family:10: EM / token acc" in lines[0]
    assert lines[2].startswith("| prior (shift by one) | 3 | ") and lines[2].count("±") == 2 + 2 * 3
    assert (out / "continuum.png").read_bytes()[:4] == b"\x89PNG" and (out / "continuum.png").stat().st_size > 10_000
    replot = subprocess.run([sys.executable, "-m", "megatron_sft", "continuum", "--out", str(out), "--replot"],
                            capture_output=True, text=True, timeout=300)
    assert replot.returncode == 0 and (out / "continuum.md").read_text().splitlines() == lines
