"""``megatron-sft plot``: training curves of one or more runs as a PNG, from their metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plot", help="PNG of training curves (loss, mean p, lr, grad norm per step) of one or more runs",
        description="Read OUTPUT/metrics.jsonl of each training run and write one PNG with four panels against the "
        "step: loss, mean token p (the capability diagnostic), learning rate and grad norm; held-out loss and mean "
        "p (data.eval) are drawn dashed in the run's colour. Several runs are overlaid, e.g. one per objective. "
        "Works while a run is still training (it plots the steps logged so far); no TensorBoard needed.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output directories (or metrics.jsonl files)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default ./curves.png)")
    parser.add_argument("--labels", help="comma-separated legend names, one per run (default: the run directories' names)")
    parser.add_argument("--title", default="", help="figure title")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.curves import CurvesError, default_labels, load_run, plot_curves, summary_line

    try:
        labels = args.labels.split(",") if args.labels else default_labels(args.runs)
        if len(labels) != len(args.runs):
            raise CurvesError(f"--labels names {len(labels)} runs, {len(args.runs)} given")
        runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
    except CurvesError as err:
        print(f"megatron-sft plot: error: {err}")
        return 2
    out = plot_curves(runs, Path(args.out), args.title)
    for curves in runs:
        print(summary_line(curves))
    print(f"wrote {out}")
    return 0
