"""Files the analyses write: PNG figures and Markdown, atomically (through :mod:`lit_prune.io`), and the
``report.md`` index that joins the sections of the analyses present in one output folder."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from lit_prune.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

# Sections of report.md, in order: (file written by an analysis, its entry point).
_SECTIONS = (("calibration.md", "lit_prune.analysis.calibration"), ("attribution.md", "lit_prune.analysis.attribution"))
_INDEX_MARK = "<!-- written by lit_prune.analysis: sections are rebuilt from the files beside it -->"


def save_figure(fig, path: Path) -> str:
    """Render a matplotlib figure to PNG bytes and write them atomically; close the figure; return the file name."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path.name


def fmt(value, spec: str = ".3f", undefined: str = "undefined") -> str:
    """``value`` formatted with ``spec``, or the word ``undefined`` for None (tables never show NaN)."""
    return undefined if value is None else format(value, spec)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the others right-aligned)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join([":--"] + ["--:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(out: Path, name: str, text: str) -> Path:
    """Write one analysis's Markdown section ``out/name`` and rebuild ``out/report.md`` from the sections present.

    Raises:
        FileExistsError: If ``out/report.md`` exists and was not written by these analyses.
    """
    atomic_write_text(out / name, text)
    index = out / "report.md"
    if index.exists() and _INDEX_MARK not in index.read_text(encoding="utf-8"):
        raise FileExistsError(f"{str(index)!r} exists and was not written by lit_prune.analysis; choose another "
                              "`--out` folder or remove it")
    parts = [_INDEX_MARK, "# NSA analyses: calibration data and neuron attribution", ""]
    for section, module in _SECTIONS:
        if (out / section).is_file():
            parts += [f"<!-- {section}: python -m {module} -->", (out / section).read_text(encoding="utf-8"), ""]
    atomic_write_text(index, "\n".join(parts))
    return out / name


def load_for_analysis(model_path: str):
    """``(model in eval mode, tokenizer with a pad token, console)`` for an analysis' command line: the model and its
    tokenizer through :mod:`lit_prune.loading` (EOS borrowed as pad when there is none), and a rich console 200
    columns wide when the output is not a terminal (so logged tables are not cut)."""
    import sys

    from rich.console import Console

    from lit_prune.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_causal_lm(model_path).eval(), tokenizer, Console(width=None if sys.stdout.isatty() else 200)
