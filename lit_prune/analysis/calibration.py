"""The calibration-data study of NSA: the same pruning calibrated on several sets, scored on one target.

"Revisiting Large Language Model Pruning using Neuron Semantic Attribution" (NSA; Ding, Sun, Fu and Hu, arXiv
2503.01542) prunes one model with one method calibrated on each of several data sets and finds that the
calibration set changes the result a lot; it relates that to the sets' semantic coverage
(:mod:`lit_prune.analysis.coverage`) and measures how much the pruned sets of two calibrations overlap. This
module runs that study for width pruning (:class:`~lit_prune.pruning.PruneSpec`, through ``make_plan``) and weight
sparsity (:class:`~lit_prune.pruning.sparsity.SparsitySpec`, through ``prune_model``):

* **Table 1 layout**: target NLL (teacher-forced, nats per response token incl. EOS, on held-out target examples;
  :func:`lit_prune.eval.perplexity.sequence_nll`) per calibration set (rows) and method x ratio (columns).
* **Coverage vs metric**: Pearson and Spearman correlation of each set's coverage with its NLL, per column, with
  ``n`` (the number of sets), scipy's p-value (Pearson: exact under bivariate normality; Spearman: scipy's
  t-distribution approximation) and an exact permutation p-value (all ``n!`` orderings for ``n <= 8``; seeded
  Monte Carlo above). With five sets neither p-value can be small unless the ordering is perfect (the exact
  two-sided permutation p-value of a perfect ordering of 5 is 2/120 = 0.017): the evidence is weak.
* **Table 7 layout**: Jaccard overlap ``|A & B| / |A | B|`` of what two calibrations keep: the kept
  (layer, neuron) pairs for width pruning, the kept weights (True entries of all masks) for sparsity, with the
  expectation for two independent random choices of the same size, ``k / (2 - k)`` for a kept fraction ``k``.

Entry point (defaults finish in a few minutes on two CPU cores with the toy model)::

    python -m lit_prune.analysis.calibration --model checkpoints/toy-math --out docs/nsa-toy
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from lit_prune.analysis._report import fmt, load_for_analysis, markdown_table, save_figure, write_section
from lit_prune.analysis.coverage import DEFAULT_COVERAGE_MODEL, semantic_coverage
from lit_prune.data.batching import labelled_batches
from lit_prune.data.prompts import format_prompt
from lit_prune.data.sources import Example, load_examples
from lit_prune.eval.perplexity import perplexity_batch, sequence_nll
from lit_prune.pruning import ActivationRecorder, PruneSpec, make_plan
from lit_prune.pruning.sparsity import SparsitySpec, prune_model
from lit_prune.eval.report import write_json

__all__ = [
    "CORRELATION_METHODS",
    "Correlation",
    "calibration_study",
    "calibration_texts",
    "correlation",
    "coverage_texts",
    "default_calibration_sets",
    "jaccard",
    "kept_mask",
    "main",
    "random_jaccard",
    "target_nll",
    "write_calibration_report",
]

log = logging.getLogger(__name__)

CORRELATION_METHODS = ("pearson", "spearman")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SHARED_DATA = _REPO_ROOT.parent / "shared" / "data"
# Exact permutation tests enumerate n! orderings up to this n (8! = 40,320); above it, a seeded Monte Carlo sample.
_EXACT_PERMUTATIONS = 8
_MONTE_CARLO_PERMUTATIONS = 20_000


def default_calibration_sets(model_dir: str | Path) -> dict[str, str]:
    """The study's default calibration sets: the shared GSM8K, DailyDialog and SQuAD copies and the toy's sets.

    Args:
        model_dir: The model folder; its ``math_capture.jsonl`` / ``qna_capture.jsonl`` are added when present.

    Returns:
        ``{name: path}`` of the files that exist.
    """
    candidates = {"gsm8k": _SHARED_DATA / "gsm8k" / "train.jsonl",
                  "dailydialog": _SHARED_DATA / "dailydialog" / "validation.txt",
                  "squad": _SHARED_DATA / "squad" / "small-v2.json",
                  "toy-math": Path(model_dir) / "math_capture.jsonl",
                  "toy-qna": Path(model_dir) / "qna_capture.jsonl"}
    return {name: str(path) for name, path in candidates.items() if path.is_file()}


# ---------------------------------------------------------------------------------------------------- statistics
def jaccard(first: torch.Tensor, second: torch.Tensor) -> float:
    """Jaccard index ``|A & B| / |A | B|`` of two boolean masks of the same shape (True = in the set).

    Args:
        first: A boolean tensor.
        second: A boolean tensor of the same shape.

    Returns:
        The index in [0, 1].

    Raises:
        ValueError: If the shapes differ, a mask is not boolean, or both sets are empty (the index is undefined).
    """
    for name, mask in (("first", first), ("second", second)):
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise ValueError(f"`{name}` must be a boolean tensor; got "
                             f"{mask.dtype if torch.is_tensor(mask) else type(mask).__name__}")
    if first.shape != second.shape:
        raise ValueError(f"`first` {tuple(first.shape)} and `second` {tuple(second.shape)} must have the same shape")
    union = int((first | second).sum())
    if union == 0:
        raise ValueError("the Jaccard index of two empty sets is undefined")
    return int((first & second).sum()) / union


def random_jaccard(kept_fraction: float) -> float:
    """Expected Jaccard index of two independent uniformly random subsets that each keep ``kept_fraction`` of N
    items, for large N: ``k^2 / (2k - k^2) = k / (2 - k)``.

    Raises:
        ValueError: If ``kept_fraction`` is not in (0, 1].
    """
    if not 0 < kept_fraction <= 1:
        raise ValueError(f"`kept_fraction` must be in (0, 1]; got {kept_fraction!r}")
    return kept_fraction / (2 - kept_fraction)


def kept_mask(kept_indices: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """``(layers, width)`` boolean mask, True at the kept neurons of a width plan (``PrunePlan.kept_indices``).

    Raises:
        ValueError: If an index is outside ``[0, width)``.
    """
    mask = torch.zeros(len(kept_indices), width, dtype=torch.bool)
    for layer, indices in enumerate(kept_indices):
        bad = [i for i in indices if not 0 <= i < width]
        if bad:
            raise ValueError(f"kept indices {bad[:5]} of layer {layer} lie outside [0, {width})")
        mask[layer, list(indices)] = True
    return mask


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient with its sample size and two p-values (two-sided).

    Attributes:
        method: ``pearson`` or ``spearman``.
        r: The coefficient, or None when undefined (an input is constant).
        n: Number of pairs.
        p_value: scipy's p-value (Pearson: exact under bivariate normality; Spearman: t-distribution
            approximation), or None when undefined.
        p_permutation: Share of the orderings of ``y`` whose ``|r|`` is at least the observed one (exact for
            ``n <= 8``), or None when undefined.
        permutations: Orderings the permutation p-value is based on.
        exact: Whether every ordering was enumerated.
    """

    method: str
    r: float | None
    n: int
    p_value: float | None
    p_permutation: float | None
    permutations: int
    exact: bool

    def to_dict(self) -> dict:
        return {"method": self.method, "r": self.r, "n": self.n, "p_value": self.p_value,
                "p_permutation": self.p_permutation, "permutations": self.permutations, "exact": self.exact}


def _coefficient(x: Sequence[float], y: Sequence[float], method: str) -> float:
    from scipy import stats

    return float((stats.pearsonr if method == "pearson" else stats.spearmanr)(x, y)[0])


def correlation(x: Sequence[float], y: Sequence[float], method: str = "pearson", seed: int = 0) -> Correlation:
    """Pearson or Spearman correlation of ``x`` and ``y`` with n, scipy's p-value and a permutation p-value.

    The permutation p-value (Fisher's randomisation test) is ``#{orderings pi of y : |r(x, pi(y))| >= |r|} /
    #orderings``, over all ``n!`` orderings for ``n <= 8`` (exact; the observed ordering counts) or 20,000 seeded
    random ones above.

    Args:
        x: First variable (at least 3 finite values).
        y: Second variable, same length.
        method: One of :data:`CORRELATION_METHODS`.
        seed: Seed of the Monte Carlo orderings (n > 8).

    Returns:
        The :class:`Correlation`; ``r`` and the p-values are None (undefined) when ``x`` or ``y`` is constant.

    Raises:
        ValueError: For an unknown method, different lengths, fewer than 3 pairs or non-finite values.
    """
    if method not in CORRELATION_METHODS:
        raise ValueError(f"`method` must be one of {CORRELATION_METHODS}; got {method!r}")
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length; got {len(x)} and {len(y)}")
    if len(x) < 3:
        raise ValueError(f"a correlation with a p-value needs at least 3 pairs; got {len(x)}")
    if not all(math.isfinite(v) for v in x + y):
        raise ValueError("`x` and `y` must be finite numbers (a NaN or infinity was given)")
    n = len(x)
    exact = n <= _EXACT_PERMUTATIONS
    permutations = math.factorial(n) if exact else _MONTE_CARLO_PERMUTATIONS
    if len(set(x)) == 1 or len(set(y)) == 1:
        return Correlation(method, None, n, None, None, permutations, exact)
    from scipy import stats

    result = (stats.pearsonr if method == "pearson" else stats.spearmanr)(x, y)
    r, p_value = float(result[0]), float(result[1])
    if exact:
        orderings = itertools.permutations(y)
    else:
        rng = random.Random(seed)
        orderings = (rng.sample(y, n) for _ in range(permutations))
    extreme = sum(abs(_coefficient(x, list(order), method)) >= abs(r) - 1e-12 for order in orderings)
    return Correlation(method, r, n, p_value, extreme / permutations, permutations, exact)


# ---------------------------------------------------------------------------------------------------- data
def calibration_texts(tokenizer, examples: Sequence[Example]) -> list[tuple[str, str | None]]:
    """``(prompt in the chat template, reference response)`` pairs, as the capture and sparsity callbacks see them."""
    return [(format_prompt(tokenizer, example), example.response or None) for example in examples]


def coverage_texts(examples: Sequence[Example]) -> list[str]:
    """The texts whose coverage is measured: each example's prompt and response, without instruction or chat
    markup (which every example of a set shares and which would only raise the similarity)."""
    return [example.prompt + ("\n" + example.response if example.response else "") for example in examples]


@torch.no_grad()
def target_nll(model: nn.Module, tokenizer, examples: Sequence[Example], max_length: int = 512,
               batch_size: int = 16) -> dict:
    """Teacher-forced NLL per response token (EOS included) of ``examples`` in the chat template.

    Args:
        model: The causal LM to score.
        tokenizer: Its tokenizer (with a pad token).
        examples: Examples with a reference response.
        max_length: Longer prompt + response rows are dropped (counted), never cut.
        batch_size: Rows per forward pass.

    Returns:
        ``{"nll", "tokens", "dropped"}``.

    Raises:
        ValueError: If no example has a response or every row is too long.
    """
    scored = [e for e in examples if e.response]
    if not scored:
        raise ValueError("`examples` hold no example with a reference response to score")
    total, tokens, dropped = 0.0, 0, 0
    device = next(model.parameters()).device
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        batch, kept = perplexity_batch(tokenizer, [e.prompt for e in chunk], [e.response for e in chunk],
                                       [e.kind for e in chunk], max_length)
        dropped += kept.count(False)
        if batch is None:
            continue
        sums, counts = sequence_nll(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    batch["labels"].to(device))
        total, tokens = total + float(sums.sum()), tokens + int(counts.sum())
    if tokens == 0:
        raise ValueError(f"every target example is longer than `max_length`={max_length} tokens")
    return {"nll": total / tokens, "tokens": tokens, "dropped": dropped}


# ---------------------------------------------------------------------------------------------------- the study
def _column(kind: str, label: str, ratio: float) -> str:
    return f"{kind} {label} {ratio:.0%}"


def calibration_study(model: nn.Module, tokenizer, calibration_sets: Mapping[str, Sequence[Example]],
                      target: Sequence[Example], width_specs: Sequence[PruneSpec] = (),
                      sparsity_specs: Sequence[SparsitySpec] = (), coverage_model: str = DEFAULT_COVERAGE_MODEL,
                      max_length: int = 256, batch_size: int = 8, console: Console | None = None) -> dict:
    """Prune ``model`` with every spec calibrated on every set; score each copy on ``target``.

    Args:
        model: The dense causal LM (not modified; every pruning runs on a deep copy).
        tokenizer: Its tokenizer, with a pad token.
        calibration_sets: ``{name: examples}``, at least 3 sets of at least 2 examples each.
        target: Held-out examples with responses (the metric).
        width_specs: Width prunings (each calibrated with one capture per set on prompt + response tokens).
        sparsity_specs: Weight-sparsity prunings.
        coverage_model: Sentence-embedding model of the coverage.
        max_length: Tokens per calibration text (longer ones are cut) and per target row (longer ones dropped).
        batch_size: Calibration texts per batch.
        console: Where the progress bar goes (None: a new console).

    Returns:
        Plain data: ``sets`` (per set: path-free facts, coverage, tokens), ``dense`` NLL, ``columns`` (one per
        spec and ratio: kind, label, ratio, kept fraction, NLL per set, correlations, Jaccard matrix) and
        ``seconds``.

    Raises:
        ValueError: For fewer than 3 sets, a set with fewer than 2 examples, no spec, or a spec that does not fit.
    """
    if len(calibration_sets) < 3:
        raise ValueError(f"`calibration_sets` must hold at least 3 sets for a correlation; got {len(calibration_sets)}")
    for name, examples in calibration_sets.items():
        if len(examples) < 2:
            raise ValueError(f"calibration set {name!r} holds {len(examples)} example(s); coverage needs at least 2")
    if not width_specs and not sparsity_specs:
        raise ValueError("give at least one of `width_specs` and `sparsity_specs`")
    for spec in width_specs:
        if spec.capture != "response":
            raise ValueError(f"the study captures on prompt + response tokens; got a PruneSpec with `capture`="
                             f"{spec.capture!r}")
        spec.check_model(model)
    for spec in sparsity_specs:
        spec.check_model(model)
    console = console or Console()
    started = time.perf_counter()
    needs = set().union(*(spec.needs() for spec in width_specs)) if width_specs else set()
    if "gradients" in needs or "distractor" in needs:
        raise ValueError("the study captures forward statistics of the calibration set only; criteria that need "
                         f"gradients or a distractor set are not supported (needs: {sorted(needs)})")
    dense = target_nll(model, tokenizer, target, max_length=max(max_length, 512))
    sets, columns = {}, {}
    steps = len(calibration_sets) * (1 + len(width_specs) + len(sparsity_specs))
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("calibration study", total=steps)
        for name, examples in calibration_sets.items():
            progress.update(task, description=f"{name}: coverage")
            begin = time.perf_counter()
            coverage = semantic_coverage(coverage_texts(examples), coverage_model)
            batches, cut = labelled_batches(tokenizer, calibration_texts(tokenizer, examples), "response",
                                            max_length, batch_size)
            tokens = sum(int(mask.sum()) for _, mask, _ in batches)
            stats = None
            if width_specs:
                recorder = ActivationRecorder(model, gram="gram" in needs)
                with recorder.recording():
                    for input_ids, mask, _ in batches:
                        recorder.observe(model, input_ids, mask, "target")
                stats = recorder.finalize()
                stats.metadata["capture"] = "response"
            sets[name] = {"examples": len(examples), "tokens": tokens, "cut": cut, "coverage": coverage,
                          "capture_s": time.perf_counter() - begin}
            progress.advance(task)
            for spec in width_specs:
                progress.update(task, description=f"{name}: {spec.label} {spec.ratio:.0%}")
                result = make_plan(model, stats, spec)
                pruned = result.apply(copy.deepcopy(model))
                column = columns.setdefault(_column("width", spec.label, spec.ratio), {
                    "kind": "width", "label": spec.label, "ratio": spec.ratio,
                    "kept_fraction": result.plan.kept_width / result.plan.original_width, "nll": {}, "_masks": {}})
                column["nll"][name] = target_nll(pruned, tokenizer, target, max_length=max(max_length, 512))["nll"]
                column["_masks"][name] = kept_mask(result.plan.kept_indices, result.plan.original_width)
                del pruned
                progress.advance(task)
            for spec in sparsity_specs:
                progress.update(task, description=f"{name}: {spec.label}")
                pruned = copy.deepcopy(model)
                result = prune_model(pruned, [(ids, mask) for ids, mask, _ in batches], spec)
                column = columns.setdefault(_column("sparsity", spec.method + " " + spec.pattern, spec.sparsity), {
                    "kind": "sparsity", "label": f"{spec.method} {spec.pattern}", "ratio": spec.sparsity,
                    "kept_fraction": 1 - spec.sparsity, "nll": {}, "_masks": {}})
                column["nll"][name] = target_nll(pruned, tokenizer, target, max_length=max(max_length, 512))["nll"]
                column["_masks"][name] = torch.cat([result.masks[k].flatten() for k in sorted(result.masks)])
                del pruned
                progress.advance(task)
    names = list(calibration_sets)
    coverages = [sets[n]["coverage"] for n in names]
    for column in columns.values():
        masks = column.pop("_masks")
        nll = [column["nll"][n] for n in names]
        column["correlation"] = {m: correlation(coverages, nll, m).to_dict() for m in CORRELATION_METHODS}
        column["jaccard"] = {a: {b: jaccard(masks[a], masks[b]) for b in names} for a in names}
        column["random_jaccard"] = random_jaccard(column["kept_fraction"])
        column["best_set"] = min(names, key=lambda n: column["nll"][n])
    return {"sets": sets, "dense": dense, "columns": columns, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------- the report
def _nll_table(study: dict) -> tuple[list[str], list[list[str]]]:
    columns = ["calibration set", "coverage"] + list(study["columns"])
    rows = [["dense (no pruning)", "-"] + [fmt(study["dense"]["nll"], ".4f")] * len(study["columns"])]
    for name, info in study["sets"].items():
        rows.append([name, fmt(info["coverage"])] + [fmt(c["nll"][name], ".4f") for c in study["columns"].values()])
    return columns, rows


def _correlation_rows(study: dict) -> list[list[str]]:
    rows = []
    for key, column in study["columns"].items():
        for method, corr in column["correlation"].items():
            rows.append([key, method, fmt(corr["r"], "+.3f"), str(corr["n"]), fmt(corr["p_value"]),
                         fmt(corr["p_permutation"]) + ("" if corr["exact"] else " (MC)")])
    return rows


def _figures(study: dict, out: Path, model_name: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(study["sets"])
    families = {}
    for column in study["columns"].values():
        families.setdefault((column["kind"], column["label"]), []).append(column)
    files = {}
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(4.2 * (len(families) + 1), 4.0), dpi=110)
    colours = plt.cm.tab10.colors
    for ax, ((kind, label), family) in zip(axes, families.items()):
        family = sorted(family, key=lambda c: c["ratio"])
        for index, name in enumerate(names):
            ax.plot([100 * c["ratio"] for c in family], [c["nll"][name] for c in family], marker="o",
                    color=colours[index % 10], label=f"{name} (cov {study['sets'][name]['coverage']:.2f})")
        ax.axhline(study["dense"]["nll"], color="grey", linestyle=":", label="dense")
        ax.set_title(f"{kind}: {label}")
        ax.set_xlabel("pruned %" + (" of MLP neurons" if kind == "width" else " of weights"))
        ax.set_ylabel("target NLL (nats / token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for index, (key, column) in enumerate(study["columns"].items()):
        ratios = sorted({c["ratio"] for c in study["columns"].values() if c["label"] == column["label"]})
        if column["ratio"] != ratios[len(ratios) // 2]:
            continue  # one ratio per family: the middle one
        xs = [study["sets"][n]["coverage"] for n in names]
        ys = [column["nll"][n] for n in names]
        r = column["correlation"]["spearman"]["r"]
        ax.scatter(xs, ys, label=f"{key} (Spearman {fmt(r, '+.2f')})", color=colours[index % 10])
        for name, x, y in zip(names, xs, ys):
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("semantic coverage of the calibration set")
    ax.set_ylabel("target NLL (nats / token)")
    ax.set_title(f"coverage vs target NLL (n = {len(names)})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{model_name}: calibration set vs target NLL (no recovery)")
    fig.tight_layout()
    files["nll"] = save_figure(fig, out / "calibration_nll.png")

    shown = [k for k, c in study["columns"].items()
             if c["ratio"] == sorted({d["ratio"] for d in study["columns"].values()
                                      if d["label"] == c["label"]})[len({d["ratio"] for d in study["columns"].values()
                                                                          if d["label"] == c["label"]}) // 2]]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.3 * len(shown) + 1.5, 4.2), dpi=110, squeeze=False)
    for position, (ax, key) in enumerate(zip(axes[0], shown)):
        column = study["columns"][key]
        matrix = [[column["jaccard"][a][b] for b in names] for a in names]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names if position == 0 else [], fontsize=7)
        ax.set_title(f"{key}\n(random: {column['random_jaccard']:.2f})", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Jaccard of kept sets")
    fig.suptitle("overlap of what two calibrations keep", fontsize=10)
    files["jaccard"] = save_figure(fig, out / "calibration_jaccard.png")
    return files


def _markdown(study: dict, settings: dict, files: dict) -> str:
    columns, rows = _nll_table(study)
    lines = ["## Calibration data (NSA Table 1 and Table 7 layouts)", "",
             f"Model `{settings['model']}`; target: teacher-forced NLL (nats per response token, EOS included) on "
             f"{study['dense']['tokens']} tokens of `{settings['target']}`; no recovery (no LoRA). Each calibration "
             f"set: {settings['samples']} examples (seed {settings['seed']}), prompt in the chat template + reference "
             f"response, cut at {settings['max_length']} tokens. Coverage: 1 - mean pairwise cosine of "
             "all-MiniLM-L6-v2 embeddings of prompt + response (no template). Width columns: `make_plan` with "
             f"`multiple_of` {settings['multiple_of']}; sparsity columns: `prune_model` on every linear of every "
             f"decoder layer. Wall time of this run: {settings['wall_s']:.0f} s "
             f"({settings['threads']} torch thread(s) on a shared 2-core CPU).", "",
             "### Target NLL per calibration set", "", markdown_table(columns, rows), "",
             "Calibration tokens per set: " + ", ".join(f"{n} {s['tokens']}" + (f" ({s['cut']} texts cut)" if s["cut"]
                                                                                   else "")
                                                       for n, s in study["sets"].items()) + ".", "",
             "### Coverage vs target NLL", "",
             "A positive r means: the more diverse the calibration set, the *worse* the pruned model on the target.", "",
             markdown_table(["column", "method", "r", "n", "p (scipy)", "p (exact permutation)"],
                            _correlation_rows(study)), "",
             f"With n = {len(study['sets'])} calibration sets this is weak evidence whatever the p-value: one set "
             "moves r a lot, and the sets differ in more than coverage (domain, length, template match).", "",
             "### Overlap of the kept sets (Jaccard)", ""]
    names = list(study["sets"])
    for key, column in study["columns"].items():
        lines += [f"**{key}** (two random choices of the same size: {column['random_jaccard']:.3f})", "",
                  markdown_table([""] + names, [[a] + [f"{column['jaccard'][a][b]:.3f}" for b in names]
                                                for a in names]), ""]
    lines += [f"![target NLL]({files['nll']})", "", f"![Jaccard]({files['jaccard']})", ""]
    return "\n".join(lines)


def write_calibration_report(study: dict, settings: dict, out: str | Path, console: Console | None = None) -> dict:
    """Print the rich tables and write ``calibration.json``, ``calibration.md``, the PNGs and ``report.md``.

    Args:
        study: :func:`calibration_study` output.
        settings: Plain data describing the run (model, target, samples, seed, max_length, multiple_of, threads,
            wall_s).
        out: Output folder (created).
        console: Where the tables go.

    Returns:
        ``{name: path}`` of the files written.
    """
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = _nll_table(study)
    table = Table(title="Target NLL per calibration set (nats / token)")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    table = Table(title=f"Coverage vs target NLL (n = {len(study['sets'])}: weak evidence)")
    for index, column in enumerate(["column", "method", "r", "n", "p (scipy)", "p (permutation)"]):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in _correlation_rows(study):
        table.add_row(*row)
    console.print(table)
    files = _figures(study, out, Path(settings["model"]).name)
    written = {"json": write_json({"settings": settings, **study, "figures": files}, out / "calibration.json")}
    written["markdown"] = write_section(out, "calibration.md", _markdown(study, settings, files))
    written.update({name: out / file for name, file in files.items()})
    return written


# ---------------------------------------------------------------------------------------------------- entry point
def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _named_paths(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"`--sets` entries must be NAME=PATH; got {item!r}")
        named[name] = path
    return named


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.analysis.calibration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/toy-math", help="model folder (default: the toy)")
    parser.add_argument("--out", type=Path, default=Path("docs/nsa-toy"), help="output folder")
    parser.add_argument("--sets", nargs="+", default=None, metavar="NAME=PATH",
                        help="calibration sets (default: gsm8k, dailydialog, squad, toy-math, toy-qna)")
    parser.add_argument("--target", default=None, help="held-out target examples (default: <model>/math_eval.jsonl)")
    parser.add_argument("--samples", type=int, default=64, help="calibration examples per set")
    parser.add_argument("--eval-samples", type=int, default=200, help="target examples scored")
    parser.add_argument("--criteria", default="wanda_sp,compensated", help="width criteria ('' for none)")
    parser.add_argument("--ratios", type=_floats, default=_floats("0.25,0.5,0.75"), help="width ratios")
    parser.add_argument("--multiple-of", type=int, default=32)
    parser.add_argument("--sparsity-methods", default="wanda", help="mask methods ('' for none)")
    parser.add_argument("--sparsities", type=_floats, default=_floats("0.5,0.6,0.7"), help="unstructured sparsities")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--coverage-model", default=DEFAULT_COVERAGE_MODEL)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study from the command line (see ``--help``) and write the report.

    Returns:
        The study (as :func:`calibration_study`) with ``settings``.

    Raises:
        ValueError: For bad arguments (an unknown criterion or method, a ratio outside (0, 1), a set that is
            missing or too small).
    """

    args = _parser().parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("samples", "eval_samples", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1; got {getattr(args, name)}")
    width_specs = [PruneSpec(ratio, criterion, args.multiple_of, seed=args.seed)
                   for criterion in args.criteria.split(",") if criterion for ratio in args.ratios]
    sparsity_specs = [SparsitySpec(method, "unstructured", sparsity)
                      for method in args.sparsity_methods.split(",") if method for sparsity in args.sparsities]
    paths = _named_paths(args.sets) if args.sets else default_calibration_sets(args.model)
    for name, path in paths.items():
        if not Path(path).exists():
            raise ValueError(f"calibration set {name!r}: file {path!r} does not exist")
    target_path = args.target or str(Path(args.model) / "math_eval.jsonl")
    model, tokenizer, console = load_for_analysis(args.model)
    sets = {name: load_examples(path, limit=args.samples, seed=args.seed) for name, path in paths.items()}
    target = load_examples(target_path, split="test", limit=args.eval_samples, seed=args.seed)
    study = calibration_study(model, tokenizer, sets, target, width_specs, sparsity_specs, args.coverage_model,
                              args.max_length, args.batch_size, console)
    settings = {"model": args.model, "target": target_path, "sets": paths, "samples": args.samples,
                "eval_samples": len(target), "seed": args.seed, "max_length": args.max_length,
                "multiple_of": args.multiple_of, "threads": torch.get_num_threads(),
                "wall_s": time.perf_counter() - started}
    write_calibration_report(study, settings, args.out, console)
    console.print(f"wrote {args.out}/calibration.json, calibration.md, report.md and figures "
                  f"({settings['wall_s']:.0f} s)")
    return {"settings": settings, **study}


if __name__ == "__main__":
    main()
