"""``megatron-sft``: the single entry point; every sub-command documents its flags in ``--help``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_sft import __version__
from megatron_sft.commands import (compare, continuum, convert, demo, eval, objectives, prepare, probe, sbatch, selftest,
                                   train)

COMMANDS = (train, convert, prepare, probe, eval, compare, sbatch, demo, continuum, objectives, selftest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sft",
        description="Megatron-core SFT with probability-based objectives f(p) (Beyond Log Likelihood).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_sft.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
