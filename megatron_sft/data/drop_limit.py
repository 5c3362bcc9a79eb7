"""A limit on how many rows may be dropped or skipped before training refuses to start.

``data.truncation=drop`` and ``data.on_bad_row=skip`` lose rows on purpose, but nothing stopped them from
losing nearly all of them (40 of 41 rows: training then repeats one row). Above ``data.max_dropped_fraction``
the run fails before training, with the counts by reason and what to change.
"""

from __future__ import annotations

from megatron_sft.data.formatting import TokenizeReport
from megatron_sft.data.sources import DataError


def dropped_summary(report: TokenizeReport) -> str:
    """``3 of 41 rows (7.3%) dropped or skipped: 2 longer than data.max_length=32, 1 not valid UTF-8``."""
    dropped = sum(report.skipped.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in report.skipped.most_common(4))
    return (f"{dropped} of {report.rows} rows ({dropped / max(report.rows, 1):.1%}) dropped or skipped"
            f"{': ' + reasons if reasons else ''}")


def check_dropped_fraction(report: TokenizeReport, limit: float, name: str) -> None:
    """Raise :class:`DataError` when more than ``limit`` of the rows were dropped or skipped."""
    dropped = sum(report.skipped.values())
    if report.rows and dropped / report.rows > limit:
        raise DataError(
            f"{name}: {dropped_summary(report)}, more than data.max_dropped_fraction={limit:g}; fix those rows, raise "
            f"data.max_length or use data.truncation=truncate, or allow it with data.max_dropped_fraction="
            f"{min(1.0, -(-dropped * 100 // report.rows) / 100):g}"
        )
