"""``megatron-sft``: the single entry point; every sub-command documents its flags in ``--help``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from megatron_sft import __version__

# imported when the parser is built (some import torch), after `train` has started recording stop signals
COMMANDS = ("train", "convert", "prepare", "probe", "eval", "compare", "plot", "sbatch", "demo", "continuum",
            "objectives", "selftest", "plan", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sft",
        description="Megatron-core SFT with probability-based objectives f(p) (Beyond Log Likelihood).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"megatron_sft.commands.{name}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_sft import stop_signal
    from megatron_sft.library_warnings import quiet_library_warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # first thing: a SIGTERM during start-up ends the run with exit 0 (stop_signal.py)
        stop_signal.install()
    quiet_library_warnings(child_processes=True)
    args = parse_arguments(build_parser(), argv)
    return int(args.run(args) or 0)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like ``parse_args``, but ``section.key=value`` overrides may come anywhere, also after flags such as
    ``--nproc 2`` (argparse alone takes positionals only before them)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
        return args
    return parser.parse_args(argv) if extra else args  # argparse's own error for anything else


if __name__ == "__main__":
    sys.exit(main())
