"""The continuum's statistics and report without training: the t-interval on known numbers, the table's
structure and the plot file for a fake set of cells (2 tasks x 3 objectives x 2 seeds)."""

from __future__ import annotations

import json
import math

import pytest

from megatron_sft.continuum_report import (ContinuumCell, continuum_table, family_alpha, load_cells, plot_continuum,
                                           summarize, write_results)
from megatron_sft.continuum_stats import format_interval, mean_interval, t_quantile

# two-sided 95% critical values of Student's t as printed in standard tables
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045, 120: 1.980}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_has_closed_forms_at_one_and_two_degrees_of_freedom():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-8)  # Cauchy
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), rel=1e-8)


def test_mean_interval_on_known_numbers():
    interval = mean_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975,2} = 4.3027
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # 2.4841
    assert (interval.low, interval.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), rel=1e-6)
    pair = mean_interval([0.70, 0.74])  # s = 0.02828, t_{0.975,1} = 12.706
    assert pair.half_width == pytest.approx(12.7062 * 0.0282843 / math.sqrt(2), rel=1e-4)  # 0.2541
    assert mean_interval([5.0, 5.0, 5.0]).half_width == 0.0


def test_one_value_has_no_interval_and_says_so():
    interval = mean_interval([0.25])
    assert (interval.mean, interval.half_width, interval.n) == (0.25, None, 1)
    assert format_interval(interval) == "25.0% ± n/a"
    assert format_interval(mean_interval([0.2, 0.3, 0.4])) == "30.0% ± 24.8"
    with pytest.raises(ValueError):
        mean_interval([])


def _fake_cells(seeds: int = 2) -> list[ContinuumCell]:
    cells = []
    for seed in range(seeds):
        for task, base_p, slope in (("prior (shift by one)", 0.7, 0.02), ("novel (substitution cipher)", 0.2, -0.1)):
            for i, objective in enumerate(("nll", "family:0.1", "family:1", "family:10")):
                acc = 0.5 + slope * i + 0.01 * seed
                cells.append(ContinuumCell(task, objective, base_p + 0.01 * seed, acc, acc + 0.3, acc, 0.1, 0.5, 16,
                                           0.3, seed))
    return cells


def test_table_structure_for_two_tasks_three_objectives_two_seeds():
    cells = [c for c in _fake_cells() if c.objective != "family:10"]  # 2 tasks x 3 objectives x 2 seeds
    assert len(cells) == 12
    lines = continuum_table(cells).splitlines()
    assert len(lines) == 4  # header, rule, one row per task
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert "95% t-interval" in header[0] and header[1:4] == ["seeds", "base mean p", "base EM"]
    assert header[4:] == ["nll: EM / token acc", "family:0.1: EM / token acc", "family:1: EM / token acc"]
    prior = [c.strip() for c in lines[2].strip("|").split("|")]
    assert prior[:2] == ["prior (shift by one)", "2"]
    assert prior[2] == format_interval(mean_interval([0.7, 0.71]), percent=False)
    em, tok = mean_interval([0.54, 0.55]), mean_interval([0.84, 0.85])
    assert prior[6] == f"**{format_interval(em)} / {format_interval(tok)}**"  # family:1 is best on the prior task
    novel = [c.strip() for c in lines[3].strip("|").split("|")]
    assert novel[4].startswith("**") and not novel[6].startswith("**")  # nll best on the novel task


def test_partial_cells_say_how_many_seeds_they_have():
    cells = _fake_cells()
    partial = cells[:-1]  # the last run of seed 1 (novel, family:10) did not finish
    novel = continuum_table(partial).splitlines()[3]
    assert novel.rstrip(" |").endswith("(n=1)") and "± n/a" in novel.split("|")[-2]
    one_seed = continuum_table(_fake_cells(seeds=1))
    assert "n/a" in one_seed and "(n=" not in one_seed


def test_summary_and_json_round_trip_and_the_plot_is_written(tmp_path):  # 2 tasks x 4 objectives x 2 seeds
    cells = _fake_cells()
    summaries = summarize(cells)
    assert [(s.task.split()[0], s.objective, s.n) for s in summaries][:2] == [("prior", "nll", 2), ("prior", "family:0.1", 2)]
    assert family_alpha("family:0.1") == 0.1 and family_alpha("nll") is None and family_alpha("neg_p") is None
    table = write_results(tmp_path, cells, {"seeds": 2})
    assert (tmp_path / "continuum.md").read_text() == table + "\n"
    data = json.loads((tmp_path / "continuum.json").read_text())
    assert data["settings"] == {"seeds": 2} and len(data["summary"]) == 8
    assert load_cells(tmp_path / "continuum.json") == cells
    plot_continuum(cells, tmp_path / "x.png")  # the X plot: family alphas on a log axis
    plot_continuum([c for c in cells if c.objective in ("nll", "family:1")], tmp_path / "bars.png")  # bars
    plot_continuum(_fake_cells(seeds=1), tmp_path / "one_seed.png")
    for name in ("x.png", "bars.png", "one_seed.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and (tmp_path / name).stat().st_size > 10_000
