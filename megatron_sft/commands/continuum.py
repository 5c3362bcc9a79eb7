"""``megatron-sft continuum``: the paper's model-capability continuum in miniature, on a CPU in minutes."""

from __future__ import annotations

import argparse

# --objectives mode (the README's first table) and the alpha sweep (N seeds x 2 tasks x (1 + alphas) runs, sized
# so that --seeds 3 with the default alphas fits in 20 minutes on a 2-core CPU): epochs, train rows, base steps
LIST_SIZES = (4, 512, 1500)
SWEEP_SIZES = (4, 512, 1000)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "continuum", help="miniature of the capability continuum: a tiny model, a task it knows and one it does not, "
        "SFT over an alpha sweep (or a list of objectives) and seeds; table with 95%% intervals + the X plot",
        description="Pre-trains a tiny base model on one generated task (strong prior) and not on another (a "
        "substitution cipher: no prior), probes its mean token p on both, fine-tunes each with nll and "
        "family:<alpha> for every --alphas (or with every --objectives spec) through `megatron-sft train`, over "
        "--seeds seeds (base init, pre-training order, SFT data order; the held-out rows stay fixed), and reports "
        "held-out exact match and token accuracy as mean ± 95%% t-interval in a markdown table, JSON and a PNG "
        "plot in --out (for the sweep: accuracy vs alpha, one line per task). Nothing is downloaded.",
    )
    parser.add_argument("--out", default="runs/continuum", help="working directory (default runs/continuum)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--alphas", default=None,
                      help="comma-separated alphas of f_alpha = (1 - p^alpha)/alpha for the sweep, run beside nll "
                      "(alpha -> 0); alpha 1 is -p (default 0.1,1,10)")
    mode.add_argument("--objectives", default=None,
                      help="comma-separated objective specs instead of the sweep, e.g. nll,neg_p,adaptive_mix")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per task x objective (default 1; "
                        "--seeds 3 with the default sweep takes ~20 minutes on a 2-core CPU)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"SFT epochs per run (default {SWEEP_SIZES[0]}; {LIST_SIZES[0]} with --objectives)")
    parser.add_argument("--train-rows", type=int, default=None,
                        help=f"SFT rows per task (default {SWEEP_SIZES[1]}; {LIST_SIZES[1]} with --objectives)")
    parser.add_argument("--base-steps", type=int, default=None,
                        help=f"pre-training steps on the prior task (default {SWEEP_SIZES[2]}; {LIST_SIZES[2]} with "
                        "--objectives: its mean p lands in the model-strong range)")
    parser.add_argument("--lr", type=float, default=3e-3, help="SFT learning rate (default 3e-3)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--replot", action="store_true",
                        help="only rebuild --out's table and plot from its continuum.json (e.g. of an interrupted run)")
    parser.set_defaults(run=run)


def _objectives(args: argparse.Namespace) -> tuple[str, ...]:
    """The specs to run, validated: the --objectives list, or nll + family:<alpha> for each alpha."""
    from megatron_sft.continuum import DEFAULT_ALPHAS, alpha_sweep_objectives
    from megatron_sft.objectives import ObjectiveSpecError, parse_objective

    if args.objectives is not None:
        objectives = tuple(s.strip() for s in args.objectives.split(",") if s.strip())
    else:
        try:
            alphas = DEFAULT_ALPHAS if args.alphas is None else tuple(float(a) for a in args.alphas.split(",") if a.strip())
        except ValueError as err:
            raise ObjectiveSpecError(f"--alphas takes comma-separated numbers: {err}") from None
        if not alphas or min(alphas) <= 0:
            raise ObjectiveSpecError(f"--alphas needs positive numbers, got {args.alphas!r}")
        objectives = alpha_sweep_objectives(alphas)
    for spec in objectives:
        parse_objective(spec)
    return objectives


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_sft.continuum import run_continuum
    from megatron_sft.continuum_report import load_cells, plot_continuum, write_results
    from megatron_sft.objectives import ObjectiveSpecError

    if args.replot:
        out = Path(args.out)
        if not (out / "continuum.json").is_file():
            print(f"megatron-sft continuum: error: --replot needs {out / 'continuum.json'} (from a run with --out {out})")
            return 2
        cells = load_cells(out / "continuum.json")
        print(write_results(out, cells, _settings(out)))
        plot_continuum(cells, out / "continuum.png")
        print(f"wrote {out / 'continuum.md'} and {out / 'continuum.png'}")
        return 0
    if args.seeds < 1:
        print("megatron-sft continuum: error: --seeds must be >= 1")
        return 2
    sizes = LIST_SIZES if args.objectives is not None else SWEEP_SIZES
    epochs, train_rows, base_steps = (given if given is not None else default for given, default in
                                      zip((args.epochs, args.train_rows, args.base_steps), sizes))
    try:
        run_continuum(args.out, _objectives(args), epochs=epochs, base_steps=base_steps, train_rows=train_rows,
                      lr=args.lr, overwrite=args.overwrite, seeds=args.seeds)
    except (ObjectiveSpecError, FileExistsError) as err:
        print(f"megatron-sft continuum: error: {err}")
        return 2
    return 0


def _settings(out) -> dict:
    import json

    data = json.loads((out / "continuum.json").read_text())
    return data.get("settings", {}) if isinstance(data, dict) else {}
