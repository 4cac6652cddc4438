"""Reports: rich tables on the console, JSON and JSONL files, and comparison rows for several models."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from lit_prune.jsonl import write_json, write_jsonl  # re-exported: the reports' writers

__all__ = ["METRIC_COLUMNS", "comparison_table", "print_comparison", "write_json", "write_jsonl"]

log = logging.getLogger(__name__)

# (key, header, format) of the numbers a person compares between models.
METRIC_COLUMNS = (
    ("exact_match", "GSM8K EM", "{:.1%}"),
    ("pass_at_1", "HumanEval pass@1", "{:.1%}"),
    ("trap_type1", "Trap T1", "{:.1%}"),
    ("trap_type2", "Trap T2", "{:.1%}"),
    ("trap_total", "Traps", "{:.1%}"),
    ("sss", "Distractor sim.", "{:.3f}"),
    ("ppl_target", "PPL target", "{:.2f}"),
    ("ppl_distractor", "PPL distractor", "{:.2f}"),
    ("ppl_general", "PPL text", "{:.2f}"),
    ("parameters", "Params", "{:,}"),
    ("mlp_width", "d_ff", "{}"),
    ("weights_mb", "Weights (MB)", "{:.1f}"),
    ("peak_memory_mb", "Peak mem (MB)", "{:.0f}"),
    ("decode_tokens_per_s", "Tokens/s", "{:.1f}"),
)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


# The resource columns; the others are quality. A narrow terminal gets the two halves as two tables.
RESOURCE_KEYS = ("parameters", "mlp_width", "weights_mb", "peak_memory_mb", "decode_tokens_per_s")


def comparison_table(results: Sequence[dict], title: str = "lit_prune evaluation",
                     keys: Sequence[str] | None = None) -> Table:
    """One row per model (``result["label"]``), one column per metric any of them has (only ``keys``, if given)."""
    columns = [c for c in METRIC_COLUMNS if any(r.get(c[0]) is not None for r in results)
               and (keys is None or c[0] in keys)]
    table = Table(title=title)
    table.add_column("Model", style="bold")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for result in results:
        table.add_row(str(result.get("label", "?")), *(_cell(result.get(key), fmt) for key, _, fmt in columns))
    return table


def print_comparison(results: Sequence[dict], title: str = "lit_prune evaluation", console: Console | None = None) -> str:
    """Print the comparison table and return it as plain text (for READMEs and logs)."""
    table = comparison_table(results, title)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
            console = Console(width=200)
    if console.measure(table, options=console.options.update(max_width=10_000)).maximum <= console.width:
        console.print(table)
    else:  # a narrow terminal: quality and resources as two tables rather than one squeezed unreadable
        quality = [key for key, _, _ in METRIC_COLUMNS if key not in RESOURCE_KEYS]
        console.print(comparison_table(results, title, quality))
        console.print(comparison_table(results, f"{title}: resources", RESOURCE_KEYS))
    plain = Console(width=160, record=True, file=open(os.devnull, "w"))
    plain.print(table)
    return plain.export_text()
