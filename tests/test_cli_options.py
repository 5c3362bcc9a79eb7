"""CLI options that change no training: `train --print` and `objectives --plot` (in-process, through the CLI's parser)."""

from __future__ import annotations

import torch
import yaml

from megatron_sft.cli import build_parser


def _cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


def test_train_print_shows_resolved_values_and_refuses_unknown_keys(tmp_path, capsys):
    """--print reads the YAML, applies the overrides and prints one value (or all) without training."""
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  checkpoint: ck\ndata:\n  train: [a.jsonl]\n"
                      "parallel:\n  tensor: 4\noptim:\n  lr: 2.0e-5\n")
    assert _cli(["train", str(config), "parallel.tensor=2", "--print", "parallel.tensor"]) == 0
    assert capsys.readouterr().out == "2\n"
    assert _cli(["train", str(config), "--print", "output_dir"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'run'}\n"
    assert _cli(["train", str(config), "--print", "parallel"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tensor"] == 4
    assert _cli(["train", str(config), "objective.name=neg_p", "--print", "all"]) == 0
    everything = yaml.safe_load(capsys.readouterr().out)
    assert everything["objective"]["name"] == "neg_p" and everything["optim"]["lr"] == 2e-5
    assert everything["optim"]["betas"] == [0.9, 0.95]  # defaults are resolved too
    assert not (tmp_path / "run").exists(), "--print must not start a run"
    assert _cli(["train", str(config), "--print", "parallel.bogus"]) == 2
    assert "--print parallel.bogus: no such config key" in capsys.readouterr().out


def test_objectives_plot_draws_w_f_of_each_objective(tmp_path, monkeypatch, capsys):
    """The plotted curves are W_f(p) = w(p)(1 - p) normalised to peak 1: 1 - p for NLL, 4p(1 - p) for -p,
    p^2 (1 - p) / max for family:2; batch-dependent objectives (percentiles) are left out."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    out = tmp_path / "wf.png"
    assert _cli(["objectives", "nll", "neg_p", "family:2", "nll_top:50", "--plot", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = figures[0].axes
    lines = {line.get_label().split(" ")[0]: line for line in axes.get_lines()}
    assert set(lines) == {"nll", "neg_p", "family:2"}
    p = torch.tensor(lines["nll"].get_xdata(), dtype=torch.float64)
    expected = {"nll": 1 - p, "neg_p": p * (1 - p), "family:2": p**2 * (1 - p)}
    for name, curve in expected.items():
        got = torch.tensor(lines[name].get_ydata(), dtype=torch.float64)
        torch.testing.assert_close(got, curve / curve.max(), rtol=1e-9, atol=1e-12, msg=name)
