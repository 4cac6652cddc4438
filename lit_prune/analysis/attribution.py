"""Neuron semantic attribution (NSA Sec. 3.3): which MLP neurons carry the task-relevant tokens, and what pruning
leaves of them.

"Revisiting Large Language Model Pruning using Neuron Semantic Attribution" (NSA; Ding, Sun, Fu and Hu, arXiv
2503.01542) links neurons to influential words and compares their activations before and after pruning. As issue
16 states the score, for neuron ``j`` of layer ``l`` with ``h`` the input of ``down_proj`` and a predicate that
marks task-relevant tokens ``R`` among the valid (non-padding) tokens ``V`` of a text set::

    relevance_lj = sum_{t in R} |h_ljt| / sum_{t in V} |h_ljt|          (0 for a neuron that never fires)

A neuron indifferent to the predicate scores about ``|R| / |V|``; one that fires only on relevant tokens scores 1.
The sums are streamed with :class:`lit_prune.pruning.ActivationRecorder` (its ``token_mask`` selects ``R``), so
memory is O(layers x d_ff) whatever the number of texts; this costs two forward passes per batch (one per token set).

A predicate is a regular expression over the text: a token is relevant when its characters overlap a match
(offsets from a fast tokenizer). Presets (:data:`PREDICATES`): ``math``, numbers, arithmetic operators and the
``\\boxed{...}`` answer; ``code``, identifiers and keywords (every ``[A-Za-z_]\\w*`` word). A user word list
(:meth:`TokenPredicate.from_words`) or regular expression is the same object.

After a pruning, each top neuron's activation ``mean_t |h_ljt|`` on the same texts is measured again: its surviving
share is ``after / before``; a neuron removed by width pruning has activation 0.

Entry point::

    python -m lit_prune.analysis.attribution --model checkpoints/toy-math --out docs/nsa-toy
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from lit_prune.analysis._report import load_for_analysis, markdown_table, save_figure, write_section
from lit_prune.analysis.calibration import calibration_texts
from lit_prune.data.batching import labelled_batches
from lit_prune.data.prompts import format_prompt
from lit_prune.data.sources import Example, load_examples
from lit_prune.pruning import ActivationRecorder, PruneSpec, find_swiglu_mlps, make_plan
from lit_prune.pruning.sparsity import SparsitySpec, prune_model
from lit_prune.eval.report import write_json

__all__ = [
    "PREDICATES",
    "Attribution",
    "TokenPredicate",
    "attribution_after",
    "attribution_batches",
    "main",
    "mean_activation",
    "neuron_relevance",
    "relevant_token_mask",
    "token_activations",
    "top_neurons",
    "write_attribution_report",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenPredicate:
    """Task-relevant tokens: those whose characters overlap a match of ``pattern`` in the text.

    Attributes:
        name: Shown in reports and errors.
        pattern: A Python regular expression.
        ignore_case: Match case-insensitively.

    Raises:
        ValueError: If ``pattern`` is not a valid regular expression or matches the empty string.
    """

    name: str
    pattern: str
    ignore_case: bool = False

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        except re.error as error:
            raise ValueError(f"`pattern` must be a regular expression; got {self.pattern!r} ({error})") from None
        if compiled.fullmatch(""):
            raise ValueError(f"`pattern` {self.pattern!r} matches the empty string; it would mark no character")

    @classmethod
    def from_words(cls, words: Sequence[str], name: str = "words", ignore_case: bool = True) -> TokenPredicate:
        """The predicate that marks whole occurrences of any of ``words``.

        Raises:
            ValueError: If ``words`` is empty or holds an empty string.
        """
        words = [w for w in words]
        if not words or any(not isinstance(w, str) or not w.strip() for w in words):
            raise ValueError(f"`words` must be a non-empty list of non-empty strings; got {words!r}")
        alternatives = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
        return cls(name, rf"(?<!\w)(?:{alternatives})(?!\w)", ignore_case)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the matches in ``text``."""
        flags = re.IGNORECASE if self.ignore_case else 0
        return [match.span() for match in re.finditer(self.pattern, text, flags) if match.end() > match.start()]


PREDICATES = {
    "math": TokenPredicate("math", r"\\boxed\{[^{}]+\}|\d+(?:\.\d+)?|[-+*/=×÷^%]"),
    "code": TokenPredicate("code", r"[A-Za-z_][A-Za-z0-9_]*"),
}


def relevant_token_mask(tokenizer, text: str, predicate: TokenPredicate, max_length: int = 512,
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (no special tokens added, cut at ``max_length``) and, per token, whether it is relevant.

    Args:
        tokenizer: A fast Hugging Face tokenizer (character offsets are needed).
        text: The text as the model sees it.
        predicate: Which characters are relevant.
        max_length: Tokens kept.

    Returns:
        ``(input_ids, relevant)`` of the same length.

    Raises:
        ValueError: If the tokenizer gives no character offsets (a slow tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"`tokenizer` must be a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_length], encoded["offset_mapping"][:max_length]
    marked = [False] * (len(text) + 1)
    for start, end in predicate.spans(text):
        marked[start:end] = [True] * (end - start)
    relevant = [end > start and any(marked[start:end]) for start, end in offsets]
    return list(ids), relevant


def attribution_batches(tokenizer, texts: Sequence[str], predicate: TokenPredicate, max_length: int = 512,
                        batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask, relevant_mask)`` batches of ``texts``, sorted by length and right-padded.

    Raises:
        ValueError: If ``texts`` is empty, or ``predicate`` marks no token in any text.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("`texts` must be a non-empty list of strings")
    rows = sorted((relevant_token_mask(tokenizer, text, predicate, max_length) for text in texts),
                  key=lambda row: len(row[0]))
    if not any(any(relevant) for _, relevant in rows):
        raise ValueError(f"predicate {predicate.name!r} (pattern {predicate.pattern!r}) marks no token in any of the "
                         f"{len(texts)} texts: the relevance score is undefined; give another predicate")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(1, max(len(ids) for ids, _ in chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        relevant = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, marks) in enumerate(chunk):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = 1
            relevant[i, :len(ids)] = torch.tensor(marks, dtype=torch.long)
        batches.append((input_ids, mask, relevant))
    return batches


@dataclass
class Attribution:
    """Per-neuron relevance on one text set.

    Attributes:
        relevance: ``(layers, d_ff)`` float64: ``sum_R |h| / sum_V |h|`` (0 where ``sum_V |h| = 0``).
        mean_abs: ``(layers, d_ff)`` float64: mean ``|h|`` over the valid tokens.
        tokens: Valid tokens.
        relevant_tokens: Relevant tokens.
    """

    relevance: torch.Tensor
    mean_abs: torch.Tensor
    tokens: int
    relevant_tokens: int

    @property
    def relevant_fraction(self) -> float:
        """``|R| / |V|``: the relevance of a neuron that ignores the predicate."""
        return self.relevant_tokens / self.tokens


def _record(model: nn.Module, batches, relevant: bool):
    recorder = ActivationRecorder(model)
    with recorder.recording():
        for input_ids, mask, marks in batches:
            recorder.observe(model, input_ids, mask, "target", token_mask=marks if relevant else None)
    return recorder.finalize()


@torch.no_grad()
def neuron_relevance(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     ) -> Attribution:
    """Stream ``sum |h|`` over all valid and over the relevant tokens at every ``down_proj`` input; score.

    Args:
        model: The dense causal LM.
        batches: :func:`attribution_batches` output.

    Returns:
        The :class:`Attribution`.

    Raises:
        ValueError: If no batch marks a relevant token (the score is undefined).
        NotSwiGLUError: If the model has no SwiGLU MLPs.
    """
    if not any(bool(marks.bool().any()) for _, _, marks in batches):
        raise ValueError("no relevant token in any batch: the relevance score is undefined")
    every = _record(model, batches, relevant=False)
    marked = _record(model, batches, relevant=True)
    total = every["target.abs_sum"].cpu()
    relevance = torch.where(total > 0, marked["target.abs_sum"].cpu() / total.clamp_min(1e-300),
                            torch.zeros_like(total))
    tokens = int(every["target.tokens"])
    return Attribution(relevance, total / tokens, tokens, int(marked["target.tokens"]))


@torch.no_grad()
def mean_activation(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    ) -> torch.Tensor:
    """``(layers, width)`` mean ``|h|`` per valid token of ``model`` (its current, possibly sliced, width)."""
    return _record(model, batches, relevant=False).group_mean("target", "token").cpu()


def top_neurons(relevance: torch.Tensor, k: int) -> torch.Tensor:
    """``(layers, k)`` indices of the ``k`` most relevant neurons per layer, most relevant first.

    Raises:
        ValueError: If ``k`` is not in ``[1, d_ff]``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= relevance.shape[1]:
        raise ValueError(f"`k` must be an integer in [1, {relevance.shape[1]}]; got {k!r}")
    return torch.topk(relevance, k, dim=1).indices


def _to_original(values: torch.Tensor, kept_indices: Sequence[Sequence[int]] | None, width: int) -> torch.Tensor:
    """Scatter per-neuron values of a sliced model back to the original width (0 at removed neurons)."""
    if kept_indices is None:
        return values
    full = torch.zeros(values.shape[0], width, dtype=values.dtype)
    for layer, indices in enumerate(kept_indices):
        full[layer, list(indices)] = values[layer]
    return full


def attribution_after(attribution: Attribution, neurons: torch.Tensor, after: torch.Tensor,
                      kept_indices: Sequence[Sequence[int]] | None = None) -> dict:
    """How much of each top neuron's activation survives a pruning.

    Args:
        attribution: The dense model's attribution.
        neurons: ``(layers, k)`` top neurons (:func:`top_neurons`).
        after: ``(layers, width)`` mean ``|h|`` of the pruned model on the same texts (:func:`mean_activation`);
            for a width-pruned model its sliced width, mapped back with ``kept_indices``.
        kept_indices: The width plan's kept neurons per layer; None for a pruning that keeps every neuron.

    Returns:
        Plain data: per layer ``before``/``after`` mean ``|h|`` and ``removed`` flags of the top neurons, their
        ``survival`` (``after / before``, 0 for removed), and the summaries ``top_removed_fraction``,
        ``top_mean_survival`` and, over every neuron of the model, ``all_removed_fraction`` and
        ``all_mean_survival``.

    Raises:
        ValueError: If the shapes do not fit.
    """
    width = attribution.mean_abs.shape[1]
    if kept_indices is None and after.shape != attribution.mean_abs.shape:
        raise ValueError(f"`after` {tuple(after.shape)} must have the dense shape {tuple(attribution.mean_abs.shape)}"
                         " when `kept_indices` is None")
    full = _to_original(after.double(), kept_indices, width)
    removed_all = torch.zeros_like(full, dtype=torch.bool)
    if kept_indices is not None:
        removed_all = ~torch.zeros_like(full, dtype=torch.bool).index_put_(
            (torch.repeat_interleave(torch.arange(len(kept_indices)), torch.tensor([len(k) for k in kept_indices])),
             torch.tensor([i for k in kept_indices for i in k])), torch.tensor(True))
    before = attribution.mean_abs
    survival_all = torch.where(before > 0, full / before.clamp_min(1e-300), torch.zeros_like(before))
    take = lambda tensor: torch.gather(tensor, 1, neurons)
    survival, removed = take(survival_all), take(removed_all)
    return {"before": take(before).tolist(), "after": take(full).tolist(), "removed": removed.tolist(),
            "survival": survival.tolist(), "top_removed_fraction": float(removed.double().mean()),
            "top_mean_survival": float(survival.mean()), "all_removed_fraction": float(removed_all.double().mean()),
            "all_mean_survival": float(survival_all[before > 0].mean())}


@contextmanager
def _token_hooks(model: nn.Module, columns: Mapping[int, list[int]], store: dict) -> Iterator[None]:
    """Pre-hooks that copy ``|h|`` of the given columns of one text (for the token figure only: a whole-text
    per-token tensor, which the streaming recorder never keeps)."""

    def hook(layer: int):
        def read(module: nn.Module, args: tuple) -> None:
            store[layer] = args[0].detach()[0, :, columns[layer]].abs().float().cpu()

        return read

    handles = [b.down_proj.register_forward_pre_hook(hook(b.layer_index)) for b in find_swiglu_mlps(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def token_activations(model: nn.Module, input_ids: Sequence[int], neurons: torch.Tensor, scale: torch.Tensor,
                      kept_indices: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per token of one text: the mean over the top neurons of ``|h| / scale`` (the Figure 1 analogue).

    Args:
        model: Dense or pruned model.
        input_ids: The text's token ids.
        neurons: ``(layers, k)`` top neurons in the dense model's indices.
        scale: ``(layers, k)`` each neuron's dense mean ``|h|`` (so every neuron weighs the same).
        kept_indices: The width plan of a width-pruned model (removed neurons contribute 0).

    Returns:
        ``(tokens,)`` float tensor.
    """
    columns, present = {}, {}
    for layer in range(neurons.shape[0]):
        wanted = neurons[layer].tolist()
        if kept_indices is None:
            columns[layer], present[layer] = wanted, list(range(len(wanted)))
        else:
            position = {n: i for i, n in enumerate(kept_indices[layer])}
            present[layer] = [i for i, n in enumerate(wanted) if n in position]
            columns[layer] = [position[wanted[i]] for i in present[layer]]
    store: dict[int, torch.Tensor] = {}
    ids = torch.tensor([list(input_ids)], device=next(model.parameters()).device)
    with _token_hooks(model, columns, store):
        model(input_ids=ids, use_cache=False)
    total = torch.zeros(ids.shape[1])
    for layer in range(neurons.shape[0]):
        if present[layer]:
            total += (store[layer] / scale[layer, present[layer]].float().clamp_min(1e-12)).sum(dim=1)
    return total / neurons.numel()


# ---------------------------------------------------------------------------------------------------- the study
def _prunings(model, calibration: Mapping[str, Sequence[Example]], tokenizer, width_specs, sparsity_specs,
              max_length: int, batch_size: int):
    """Yield ``(label, pruned model, kept_indices or None)`` for every spec and calibration set."""
    for set_name, examples in calibration.items():
        batches, _ = labelled_batches(tokenizer, calibration_texts(tokenizer, examples), "response", max_length,
                                      batch_size)
        if width_specs:
            needs = set().union(*(spec.needs() for spec in width_specs))
            recorder = ActivationRecorder(model, gram="gram" in needs)
            with recorder.recording():
                for input_ids, mask, _ in batches:
                    recorder.observe(model, input_ids, mask, "target")
            stats = recorder.finalize()
            stats.metadata["capture"] = "response"
            for spec in width_specs:
                result = make_plan(model, stats, spec)
                yield (f"width {spec.label} {spec.ratio:.0%} / {set_name}", result.apply(copy.deepcopy(model)),
                       result.plan.kept_indices)
        for spec in sparsity_specs:
            pruned = copy.deepcopy(model)
            prune_model(pruned, [(ids, mask) for ids, mask, _ in batches], spec)
            yield f"sparsity {spec.label} / {set_name}", pruned, None


def _figures(out: Path, layers: int, neurons: torch.Tensor, results: dict, example: dict, model_name: str,
             predicate: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(results)
    first = next(iter(results.values()))
    before = np.array(first["before"])
    panels = [("dense (before pruning)", before, None)] + [
        (label, np.array(r["after"]), np.array(r["removed"])) for label, r in results.items()]
    k = neurons.shape[1]
    vmax = max(float(np.max(p[1])) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 0.45 * k + 2.5), (0.22 * layers + 0.35) * len(panels) + 1.0),
                             dpi=110, squeeze=False)
    for ax, (title, values, removed) in zip(axes[:, 0], panels):
        image = ax.imshow(values, aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if removed is not None and removed[i, j]:
                    text = "x"
                elif removed is not None:
                    text = f"{100 * values[i, j] / before[i, j]:.0f}" if before[i, j] > 0 else "-"
                else:
                    text = f"{int(neurons[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=5.5,
                        color="white" if values[i, j] < 0.6 * vmax else "black")
        ax.set_yticks(range(values.shape[0]), [f"L{i}" for i in range(values.shape[0])], fontsize=7)
        ax.set_xticks([])
        ax.set_title(title, fontsize=8, loc="left")
    axes[-1, 0].set_xticks(range(k), [f"#{j + 1}" for j in range(k)], fontsize=6)
    axes[-1, 0].set_xlabel(f"top-{k} '{predicate}' neurons of each layer, by relevance (dense panel: neuron index; "
                           "others: % of dense activation, x = removed)", fontsize=7)
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, label="mean |h| per token")
    fig.suptitle(f"{model_name}: activation of the task neurons before and after pruning", fontsize=9)
    files = {"heatmap": save_figure(fig, out / "attribution_heatmap.png")}

    rows = [("dense", example["dense"])] + [(label, example["after"][label]) for label in labels]
    values = np.array([r[1] for r in rows])
    tokens, relevant = example["tokens"], example["relevant"]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.2 * len(tokens) + 3.0), 0.32 * len(rows) + 2.0), dpi=120)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7,
                  fontfamily="monospace")
    for tick, marked in zip(ax.get_xticklabels(), relevant):
        if marked:
            tick.set_color("crimson")
            tick.set_fontweight("bold")
    fig.colorbar(image, ax=ax, shrink=0.8, label="top-neuron activation / dense mean")
    ax.set_title(f"which tokens drive the top '{predicate}' neurons (red: relevant tokens); one held-out text",
                 fontsize=9)
    fig.tight_layout()
    files["tokens"] = save_figure(fig, out / "attribution_tokens.png")
    return files


def _markdown(payload: dict, files: dict) -> str:
    s = payload["settings"]
    lines = ["## Neuron semantic attribution (NSA Sec. 3.3)", "",
             f"Model `{s['model']}`; {s['texts']} texts of `{s['source']}` (prompt in the chat template + reference "
             f"response); predicate `{s['predicate']}` (`{s['pattern']}`) marks {payload['relevant_tokens']} of "
             f"{payload['tokens']} tokens ({100 * payload['relevant_fraction']:.1f}%: the relevance of a neuron that "
             f"ignores it). Relevance = sum of |h| on relevant tokens / sum of |h| on all tokens, at every down_proj "
             f"input; top {s['top_k']} per layer. Prunings calibrated on "
             f"{', '.join(s['calibration'])}; activations measured again on the same texts. Wall time "
             f"{s['wall_s']:.0f} s.", "",
             "### Top task neurons per layer (dense)", "",
             markdown_table(["layer", "relevance of #1..#5", "neurons #1..#5", "mean relevance of top-k",
                             "layer median"],
                            [[str(i), ", ".join(f"{v:.3f}" for v in row["relevance"][:5]),
                              ", ".join(str(n) for n in row["neurons"][:5]), f"{row['top_mean']:.3f}",
                              f"{row['median']:.3f}"] for i, row in enumerate(payload["layers"])]), "",
             "### What each pruning leaves of them", "",
             markdown_table(["pruning / calibration", "top neurons removed", "all neurons removed",
                             "top-neuron activation kept", "all-neuron activation kept"],
                            [[label, f"{100 * r['top_removed_fraction']:.1f}%",
                              f"{100 * r['all_removed_fraction']:.1f}%", f"{100 * r['top_mean_survival']:.1f}%",
                              f"{100 * r['all_mean_survival']:.1f}%"] for label, r in payload["prunings"].items()]),
             "",
             "Activation kept: mean over neurons of (mean |h| after) / (mean |h| before), removed neurons counting 0.",
             "", f"![heatmap]({files['heatmap']})", "", f"![tokens]({files['tokens']})", ""]
    return "\n".join(lines)


def write_attribution_report(payload: dict, out: str | Path, layers: int, neurons: torch.Tensor,
                             console: Console | None = None) -> dict:
    """Print the summary table and write ``attribution.json``, ``attribution.md``, the PNGs and ``report.md``.

    Returns:
        ``{name: path}`` of the files written.
    """
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"Top-{payload['settings']['top_k']} '{payload['settings']['predicate']}' neurons per layer "
                        "after pruning")
    for index, column in enumerate(["pruning / calibration", "top removed", "all removed", "top kept", "all kept"]):
        table.add_column(column, justify="left" if index == 0 else "right")
    for label, r in payload["prunings"].items():
        table.add_row(label, f"{100 * r['top_removed_fraction']:.1f}%", f"{100 * r['all_removed_fraction']:.1f}%",
                      f"{100 * r['top_mean_survival']:.1f}%", f"{100 * r['all_mean_survival']:.1f}%")
    console.print(table)
    files = _figures(out, layers, neurons, payload["prunings"], payload["example"],
                     Path(payload["settings"]["model"]).name, payload["settings"]["predicate"])
    written = {"json": write_json({**payload, "figures": files}, out / "attribution.json")}
    written["markdown"] = write_section(out, "attribution.md", _markdown(payload, files))
    written.update({name: out / file for name, file in files.items()})
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.analysis.attribution",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/toy-math", help="model folder (default: the toy)")
    parser.add_argument("--out", type=Path, default=Path("docs/nsa-toy"))
    parser.add_argument("--texts", default=None, help="texts to attribute (default: <model>/math_eval.jsonl)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--predicate", default="math", choices=sorted(PREDICATES))
    parser.add_argument("--words", default=None, help="comma-separated word list (instead of --predicate)")
    parser.add_argument("--regex", default=None, help="regular expression (instead of --predicate)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--calibration", nargs="+", default=None, metavar="NAME=PATH",
                        help="calibration sets of the prunings (default: toy-math and toy-qna capture sets)")
    parser.add_argument("--criteria", default="wanda_sp,compensated", help="width criteria ('' for none)")
    parser.add_argument("--ratio", type=float, default=0.5, help="width ratio")
    parser.add_argument("--multiple-of", type=int, default=32)
    parser.add_argument("--sparsity-methods", default="wanda", help="mask methods ('' for none)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--example", type=int, default=0, help="index of the text of the token figure")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the attribution from the command line (see ``--help``) and write the report.

    Returns:
        The payload written to ``attribution.json``.

    Raises:
        ValueError: For bad arguments or a predicate that marks no token.
    """

    args = _parser().parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.words and args.regex:
        raise ValueError("give at most one of `--words` and `--regex`")
    if args.words:
        predicate = TokenPredicate.from_words(args.words.split(","))
    elif args.regex:
        predicate = TokenPredicate("regex", args.regex)
    else:
        predicate = PREDICATES[args.predicate]
    width_specs = [PruneSpec(args.ratio, c, args.multiple_of, seed=args.seed) for c in args.criteria.split(",") if c]
    sparsity_specs = [SparsitySpec(m, "unstructured", args.sparsity) for m in args.sparsity_methods.split(",") if m]
    calibration_paths = ({n: p for n, _, p in (item.partition("=") for item in args.calibration)} if args.calibration
                         else {"toy-math": str(Path(args.model) / "math_capture.jsonl"),
                               "toy-qna": str(Path(args.model) / "qna_capture.jsonl")})
    source = args.texts or str(Path(args.model) / "math_eval.jsonl")
    model, tokenizer, console = load_for_analysis(args.model)
    for spec in width_specs + sparsity_specs:
        spec.check_model(model)
    examples = load_examples(source, split="test", limit=args.samples, seed=args.seed)
    if not 0 <= args.example < len(examples):
        raise ValueError(f"`--example` must be in [0, {len(examples)}); got {args.example}")
    texts = [format_prompt(tokenizer, e) + (e.response or "") for e in examples]
    batches = attribution_batches(tokenizer, texts, predicate, args.max_length, args.batch_size)
    calibration = {n: load_examples(p, limit=args.calibration_samples, seed=args.seed)
                   for n, p in calibration_paths.items()}
    steps = 1 + len(calibration) * (len(width_specs) + len(sparsity_specs))
    prunings, after_tokens = {}, {}
    with Progress(console=console) as progress:
        task = progress.add_task("relevance (dense)", total=steps)
        attribution = neuron_relevance(model, batches)
        neurons = top_neurons(attribution.relevance, args.top_k)
        scale = torch.gather(attribution.mean_abs, 1, neurons)
        example_text = texts[args.example]
        example_ids, example_relevant = relevant_token_mask(tokenizer, example_text, predicate, args.max_length)
        dense_tokens = token_activations(model, example_ids, neurons, scale)
        progress.advance(task)
        for label, pruned, kept in _prunings(model, calibration, tokenizer, width_specs, sparsity_specs,
                                             args.max_length, args.batch_size):
            progress.update(task, description=label)
            prunings[label] = attribution_after(attribution, neurons, mean_activation(pruned, batches), kept)
            after_tokens[label] = token_activations(pruned, example_ids, neurons, scale, kept)
            del pruned
            progress.advance(task)
    # The token figure starts at the user's prompt: the system instruction is the same in every text.
    start_char = example_text.find(examples[args.example].prompt)
    offsets = tokenizer(example_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first = next((i for i, (s, _) in enumerate(offsets) if s >= max(0, start_char)), 0)
    pieces = [tokenizer.decode([i]) for i in example_ids]
    layers = attribution.relevance.shape[0]
    payload = {
        "settings": {"model": args.model, "source": source, "texts": len(texts), "predicate": predicate.name,
                     "pattern": predicate.pattern, "top_k": args.top_k, "calibration": calibration_paths,
                     "calibration_samples": args.calibration_samples, "width_ratio": args.ratio,
                     "multiple_of": args.multiple_of, "sparsity": args.sparsity, "max_length": args.max_length,
                     "seed": args.seed, "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started},
        "tokens": attribution.tokens, "relevant_tokens": attribution.relevant_tokens,
        "relevant_fraction": attribution.relevant_fraction,
        "layers": [{"neurons": neurons[i].tolist(), "relevance": attribution.relevance[i, neurons[i]].tolist(),
                    "top_mean": float(attribution.relevance[i, neurons[i]].mean()),
                    "median": float(attribution.relevance[i].median())} for i in range(layers)],
        "prunings": prunings,
        "example": {"index": args.example, "tokens": pieces[first:], "relevant": example_relevant[first:],
                    "dense": dense_tokens[first:].tolist(),
                    "after": {label: values[first:].tolist() for label, values in after_tokens.items()}},
    }
    write_attribution_report(payload, args.out, layers, neurons, console)
    console.print(f"wrote {args.out}/attribution.json, attribution.md, report.md and figures "
                  f"({payload['settings']['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
