"""`megatron-sft continuum` end to end at a small size (slow: six spawned training runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_continuum_miniature_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "continuum"
    done = subprocess.run([sys.executable, "-m", "megatron_sft", "continuum", "--out", str(out), "--epochs", "1",
                           "--train-rows", "64", "--base-steps", "150", "--objectives", "nll,neg_p"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = json.loads((out / "continuum.json").read_text())
    assert [(c["task"].split()[0], c["objective"]) for c in cells] == [
        ("prior", "nll"), ("prior", "neg_p"), ("novel", "nll"), ("novel", "neg_p")]
    prior, novel = cells[0]["base_mean_p"], cells[2]["base_mean_p"]
    assert prior > novel  # pre-training on the prior task gives it the stronger prior
    assert len({c["steps"] for c in cells}) == 1 and cells[0]["steps"] >= 1  # same data size for every run
    table = (out / "continuum.md").read_text()
    assert len(table.splitlines()) == 4 and "| prior (shift by one) |" in table
    assert (out / "continuum.png").stat().st_size > 10_000
