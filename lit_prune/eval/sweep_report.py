"""The sweep's Markdown report (the criteria table, the paper's Tables 2-5 for the swept model) and its figures.

The paper's own setting is the variant ``selective/paper`` (selectivity on per-prompt means of prompt tokens);
the other rows are criteria on the sweep's capture (prompt + response tokens by default, per-token statistics).
Figures: the metric of every criterion vs ratio, relative loss (Fig. 1), relative gain after fine-tuning
(Fig. 2), selective vs random (Fig. 3), selective vs reverse (Fig. 4), distractor similarity by criterion
(Fig. 5), layer-wise counts of target- vs distractor-selective neurons (Fig. 6) and trap rate vs ratio.

The metric variants are ranked by (:func:`metric_for`): the task accuracy (GSM8K exact match, else HumanEval
pass@1) when the evaluation generated, else the target NLL per response token (lower is better; a model such as
SmolLM2-135M that cannot solve the task is compared by perplexity). With NLL, the "relative loss" of Fig. 1 is the
increase in NLL over dense and Fig. 2 its decrease after recovery, both in percent.

When the sweep ran other structures (``summary["structure_runs"]``: weight-sparsity masks, and removed blocks),
"Structures at equal size" sets them beside width pruning at the same fraction of the model's parameters removed
(a zero weight counted as removed), with a figure of the metric against that fraction.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lit_prune.io import atomic_write_text  # noqa: E402

__all__ = ["Metric", "accuracy_key", "metric_for", "write_sweep_report"]

log = logging.getLogger(__name__)

PAPER = "selective/paper"


@dataclass(frozen=True)
class Metric:
    """What the report ranks variants by: a key of the evaluation results and its direction."""

    key: str
    higher_is_better: bool = True

    @property
    def unit(self) -> str:
        return "%" if self.higher_is_better else "nats/token"

    @property
    def title(self) -> str:
        return f"{self.key} ({self.unit})"

    def value(self, run: dict, stage: str = "pruned") -> float | None:
        result = run.get(stage)
        return None if not result else result.get(self.key)

    def fmt(self, value) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" if self.higher_is_better else f"{value:.3f}"

    def plot(self, value: float) -> float:
        return 100 * value if self.higher_is_better else value

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def best(self, runs: list[dict], stage: str = "pruned") -> dict:
        scored = [r for r in runs if self.value(r, stage) is not None]
        pick = max if self.higher_is_better else min
        return pick(scored, key=lambda r: self.value(r, stage))

    def relative_loss(self, base: float, value: float) -> float | None:
        """Percent of the dense score lost (accuracy) or percent increase of the NLL; positive is worse."""
        if not base:
            return None
        return 100.0 * ((base - value) if self.higher_is_better else (value - base)) / base

    def relative_gain(self, pruned: float, recovered: float) -> float:
        """Percent improvement of recovery over the pruned model (Eq. 4 for accuracy; NLL decrease otherwise)."""
        if not pruned:
            return float("nan")
        return 100.0 * ((recovered - pruned) if self.higher_is_better else (pruned - recovered)) / pruned


def metric_for(dense: dict) -> Metric:
    """The accuracy the dense result carries (exact match, else pass@1), else its target NLL.

    Raises:
        ValueError: If the result has none of them.
    """
    for key in ("exact_match", "pass_at_1"):
        if dense.get(key) is not None:
            return Metric(key, True)
    if dense.get("nll_target") is not None:
        return Metric("nll_target", False)
    raise ValueError("the sweep's evaluation produced no metric to rank by: enable a generation set (`data.eval_math` "
                     "or `data.eval_code`) or the target perplexity set (`data.eval_ppl_target`)")


def accuracy_key(result: dict) -> str:
    """The key the report ranks ``result``'s variants by (see :func:`metric_for`)."""
    return metric_for(result).key


def _by_mode(runs: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for run in runs:
        grouped[run["mode"]].append(run)
    return grouped


def _mean_random(runs: list[dict], metric: Metric) -> dict[float, float]:
    values = defaultdict(list)
    for run in runs:
        if run["criterion"] == "random" and not run.get("refit") and metric.value(run) is not None:
            values[run["ratio"]].append(metric.value(run))
    return {ratio: sum(v) / len(v) for ratio, v in values.items()}


def _series(runs: list[dict], stage: str, key: str) -> tuple[list[float], list[float]]:
    points = sorted((r["ratio"], r[stage][key]) for r in runs if r.get(stage) and r[stage].get(key) is not None)
    return [100 * p[0] for p in points], [p[1] for p in points]


def _figure(path: Path, title: str, xlabel: str, ylabel: str, draw) -> str:
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    # A sweep draws up to ~17 variants: 20 distinct colours and alternating line styles keep them apart.
    ax.set_prop_cycle(color=plt.cm.tab20.colors, linestyle=["-", "--"] * 10)
    draw(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _figures(summary: dict, out: Path, metric: Metric) -> dict[str, str]:
    runs, dense = summary["runs"], summary["dense"]
    key, base = metric.key, metric.value(summary, "dense")
    modes = _by_mode(runs)
    figures = {}
    what = "accuracy loss" if metric.higher_is_better else "NLL increase"

    def loss_curves(ax):
        for mode, mode_runs in modes.items():
            x, y = _series(mode_runs, "pruned", key)
            ax.plot(x, [metric.relative_loss(base, v) for v in y], marker="o", label=mode)

    figures["fig1"] = _figure(out / "fig1_relative_accuracy_loss.png", f"Relative {what} after pruning (Eq. 3)",
                              "nominal pruning ratio (%)", "relative loss (%)", loss_curves)

    def gain_curves(ax):
        for mode, mode_runs in modes.items():
            points = sorted((r["ratio"], r["pruned"][key], r["recovered"][key]) for r in mode_runs if r.get("recovered"))
            if points:
                ax.plot([100 * p[0] for p in points], [metric.relative_gain(p[1], p[2]) for p in points],
                        marker="o", label=mode)

    figures["fig2"] = _figure(out / "fig2_relative_gain.png", "Relative gain after LoRA recovery (Eq. 4)",
                              "nominal pruning ratio (%)", "relative gain (%)", gain_curves)

    def versus(other: str):
        def draw(ax):
            ax.axhline(metric.plot(base), color="grey", linestyle=":", label="dense")
            for mode, mode_runs in modes.items():
                if mode == PAPER or mode.startswith(other):
                    x, y = _series(mode_runs, "pruned", key)
                    ax.plot(x, [metric.plot(v) for v in y], marker="o", label=mode)
        return draw

    figures["fig3"] = _figure(out / "fig3_selective_vs_random.png", "Selective vs random pruning",
                              "nominal pruning ratio (%)", metric.title, versus("random"))
    figures["fig4"] = _figure(out / "fig4_selective_vs_reverse.png", "Selective vs reverse pruning",
                              "nominal pruning ratio (%)", metric.title, versus("reverse"))

    def similarity(ax):
        for mode, mode_runs in modes.items():
            x, y = _series(mode_runs, "pruned", "sss")
            if x:
                ax.plot(x, y, marker="o", label=mode)

    if any(r["pruned"].get("sss") is not None for r in runs):
        figures["fig5"] = _figure(out / "fig5_distractor_similarity.png",
                                  "Distractor semantic similarity to the original", "nominal pruning ratio (%)",
                                  "SSS (mean of BERTScore QnA, SBERT dialogue)", similarity)
    if any(r["pruned"].get("nll_distractor") is not None for r in runs) and dense.get("nll_target") is not None:
        def trade_off(ax):
            ax.plot([dense["nll_target"]], [dense["nll_distractor"]], "k*", markersize=10, label="dense")
            for mode, mode_runs in modes.items():
                points = sorted((r["pruned"]["nll_target"], r["pruned"]["nll_distractor"]) for r in mode_runs
                                if r["pruned"].get("nll_target") is not None)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)

        figures["trade_off"] = _figure(out / "fig_distractor_vs_target_nll.png",
                                       "Distractor vs target NLL after pruning (each point a ratio)",
                                       "target NLL (nats/token)", "distractor NLL (nats/token)", trade_off)

    def layers(ax):
        counts = summary["layer_counts"]
        index = list(range(len(counts["target"])))
        width = 0.4
        ax.bar([i - width / 2 for i in index], counts["target"], width, label="target-selective (S > 0)")
        ax.bar([i + width / 2 for i in index], counts["distractor"], width, label="distractor-selective (S < 0)")
        ax.plot(index, counts["target_strong"], "k^--", label="S > 0.5")
        ax.plot(index, counts["distractor_strong"], "kv:", label="S < -0.5")
        ax.set_xticks(index)

    figures["fig6"] = _figure(out / "fig6_layerwise_selectivity.png", "Layer-wise selective neurons", "layer",
                              "neurons", layers)

    def traps(ax):
        for mode, mode_runs in modes.items():
            x, y = _series(mode_runs, "pruned", "trap_total")
            if x:
                ax.plot(x, [100 * v for v in y], marker="o", label=mode)

    if any(r["pruned"].get("trap_total") is not None for r in runs):
        figures["traps"] = _figure(out / "fig_trap_rate.png", "Trap rate after pruning (Type 1 + Type 2)",
                                   "nominal pruning ratio (%)", "traps (%)", traps)
    return figures


def _findings(summary: dict, metric: Metric) -> list[str]:
    """Plain statements of what this run found, including where it disagrees with the paper."""
    runs, dense = summary["runs"], summary["dense"]
    base = metric.value(summary, "dense")
    selective = {r["ratio"]: metric.value(r) for r in runs if r["mode"] == PAPER}
    random_mean = _mean_random(runs, metric)
    reverse = {r["ratio"]: metric.value(r) for r in runs if r["mode"] == "reverse"}
    control = {r["ratio"]: metric.value(r) for r in runs if r["mode"] == "target_mean"}
    traps = dense.get("trap_total")
    lines = [f"Dense model: {metric.title} {metric.fmt(base)}"
             + (f", traps {100 * traps:.1f}%." if traps is not None else ".")]
    if metric.higher_is_better and not base:
        lines.append("The dense model scores 0 on its task, so the comparisons below say nothing about the method.")
        return lines
    lines += _default_findings(summary, metric)
    worse = "below" if metric.higher_is_better else "worse than"
    worse_than_random = [r for r in selective if r in random_mean and metric.better(random_mean[r], selective[r])]
    if worse_than_random:
        lines.append(f"Selective pruning scored **{worse} the mean of random pruning** at "
                     + ", ".join(f"{100 * r:.0f}%" for r in sorted(worse_than_random))
                     + " (the paper reports selective above random at every ratio).")
    elif selective and random_mean:  # both were swept: otherwise there is nothing to compare
        lines.append("Selective pruning scored at least as well as the mean of random pruning at every ratio, as in "
                     "the paper.")
    if metric.higher_is_better:
        collapsed = sorted(r for r, v in reverse.items() if v <= 0.05 * max(base, 1e-9))
        if collapsed:
            lines.append(f"Reverse pruning collapsed (<= 5% of dense accuracy) from {100 * collapsed[0]:.0f}% on "
                         "(the paper: collapse near 10%).")
        elif reverse:
            lines.append("Reverse pruning did not collapse within the swept ratios (the paper: collapse near 10%).")
    better_control = sorted(r for r in selective if r in control and metric.better(control[r], selective[r]))
    if better_control:
        lines.append("The `target_mean` control (rank by mean |h| on target prompts only) beat selectivity at "
                     + ", ".join(f"{100 * r:.0f}%" for r in better_control) + ".")
    return lines


def _default_findings(summary: dict, metric: Metric) -> list[str]:
    """Where the default criterion stands against every other variant, ratio by ratio (peers that beat it named)."""
    default = summary.get("default_criterion")
    runs = summary["runs"]
    ours = {r["ratio"]: r for r in runs if r["mode"] == default}
    if not ours:
        return []
    lines = []
    for stage in ("pruned", "recovered"):
        beaten = []
        for ratio, run in sorted(ours.items()):
            mine = metric.value(run, stage)
            if mine is None:
                continue
            better = [(r["mode"], metric.value(r, stage)) for r in runs if r["ratio"] == ratio and r["mode"] != default
                      and metric.value(r, stage) is not None and metric.better(metric.value(r, stage), mine)]
            if better:
                best = (max if metric.higher_is_better else min)(better, key=lambda item: item[1])
                beaten.append(f"{100 * ratio:.0f}% ({len(better)} variant(s), best {best[0]} {metric.fmt(best[1])} vs "
                              f"{metric.fmt(mine)})")
        what = "after pruning" if stage == "pruned" else "after LoRA recovery"
        if beaten:
            lines.append(f"The default criterion `{default}` was **beaten {what}** at " + "; ".join(beaten) + ".")
        elif any(r.get(stage) for r in ours.values()):
            lines.append(f"The default criterion `{default}` was at least as good as every other variant {what} at "
                         "every ratio.")
    return lines


# Published width criteria of other methods: the default is measured against the best of them.
PEERS = ("magnitude", "wanda_sp", "flap", "minitron", "taylor", "taylor_fisher")


def _extra_columns(summary: dict) -> list[tuple[str, str]]:
    """Perplexity columns beside the ranking metric, when the evaluation measured them."""
    return [(k, label) for k, label in (("ppl_target", "target PPL"), ("ppl_distractor", "distractor PPL"),
                                        ("ppl_general", "text PPL")) if summary["dense"].get(k) is not None]


def _has(summary: dict, key: str) -> bool:
    """Whether the dense result or any run's result carries ``key``."""
    results = [summary["dense"]] + [r[s] for r in summary["runs"] for s in ("pruned", "recovered") if r.get(s)]
    return any(result.get(key) is not None for result in results)


def _criteria_table(summary: dict, metric: Metric, ratios: list[float]) -> list[str]:
    """Per ratio and variant: the metric before -> after LoRA, traps and distractor similarity (when measured),
    perplexities, size, decode speed and planning time."""
    runs, dense = summary["runs"], summary["dense"]
    extra = _extra_columns(summary)
    traps, sss = _has(summary, "trap_total"), _has(summary, "sss")
    se = dense.get(f"{metric.key}_se")
    lines = ["## Criteria", "",
             f"{metric.title} after pruning -> after LoRA recovery ({summary['recovery_steps']} steps)"
             + (", traps after pruning (%)" if traps else "")
             + (", distractor similarity (SSS) after pruning -> after recovery" if sss else "")
             + "".join(f", {label}" for _, label in extra)
             + " (after pruning), parameters, greedy decode tokens/s at batch 1 (CPU, noisy: compare within a run), "
             "and the criterion's time: capture of the statistics it needs (shared by every variant on the same "
             "capture; listed once per capture) + scoring/selection + re-fit. Bold: best after pruning at that ratio."
             + (f" Sampling error of one model's {metric.key} over the held-out texts: +-{se:.3f} (dense); differences "
                "between variants are paired (the same texts) and far smaller, see the table below." if se else ""),
             ""]
    for capture, seconds in sorted({(r["capture"], r.get("capture_seconds")) for r in runs}, key=str):
        if seconds is not None:
            lines.append(f"- capture on {capture} tokens: {seconds:.1f} s")
    lines.append("")
    header = (f"| variant | {metric.key} pruned -> LoRA | " + ("traps | " if traps else "")
              + ("SSS pruned -> LoRA | " if sss else "") + "".join(f"{label} | " for _, label in extra)
              + "params | tok/s | select + re-fit (s) |")
    rule = "|" + "---|" * (header.count("|") - 1)

    def row(name: str, result: dict, value: str, recovered: dict | None, seconds: str) -> str:
        cells = [name, value]
        if traps:
            cells.append("-" if result.get("trap_total") is None else f"{100 * result['trap_total']:.1f}")
        if sss:
            text = "-" if result.get("sss") is None else f"{result['sss']:.3f}"
            if recovered and recovered.get("sss") is not None:
                text += f" -> {recovered['sss']:.3f}"
            cells.append(text)
        cells += [f"{result[k]:.2f}" if result.get(k) is not None else "-" for k, _ in extra]
        cells.append(f"{result['parameters']:,}" if result.get("parameters") else "-")
        cells.append(f"{result['decode_tokens_per_s']:.1f}" if result.get("decode_tokens_per_s") else "-")
        return "| " + " | ".join(cells + [seconds]) + " |"

    for ratio in ratios:
        group = [r for r in runs if r["ratio"] == ratio]
        best = metric.value(metric.best(group))
        lines += [f"### {100 * ratio:.0f}% (kept width {group[0]['kept_width']})", "", header, rule,
                  row("dense", dense, metric.fmt(metric.value(summary, "dense")), None, "-")]
        for run in sorted(group, key=lambda r: metric.plot(metric.value(r)) * (-1 if metric.higher_is_better else 1)):
            recovered = run.get("recovered")
            value = metric.fmt(metric.value(run))
            value = f"**{value}**" if metric.value(run) == best else value
            value += f" -> {metric.fmt(metric.value(run, 'recovered'))}" if recovered else ""
            lines.append(row(run["mode"], run["pruned"], value, recovered,
                             f"{sum((run.get('seconds') or {}).values()):.2f}"))
        lines.append("")
    return lines


def _versus_peers(summary: dict, metric: Metric) -> list[str]:
    """The default criterion's damage (NLL increase over dense) against the best published peer's, per ratio,
    with the paired sampling error of their difference over the held-out texts."""
    default = summary.get("default_criterion")
    if metric.higher_is_better or not default:
        return []
    from lit_prune.eval.perplexity import paired_nll_difference

    set_name = metric.key.removeprefix("nll_")
    base = metric.value(summary, "dense")
    lines = []
    for ratio in sorted({r["ratio"] for r in summary["runs"]}):
        group = [r for r in summary["runs"] if r["ratio"] == ratio and metric.value(r) is not None]
        ours = next((r for r in group if r["mode"] == default), None)
        peers = [r for r in group if r["mode"] in PEERS]
        if ours is None or not peers:
            continue
        peer, best = metric.best(peers), metric.best(group)
        mine, theirs = metric.value(ours) - base, metric.value(peer) - base
        ratio_text = f"{mine / theirs:.2f}" if theirs > 0 and mine >= 0 else "-"
        texts = [r["pruned"].get("nll_texts", {}).get(set_name) for r in (ours, peer)]
        paired = "-"
        if all(texts):
            try:
                difference, error, count = paired_nll_difference(*texts)
                paired = (f"{difference:+.3f} +- {error:.3f} ({count} texts)" if error is not None
                          else f"{difference:+.3f}")
            except ValueError:  # no text scored by both: not comparable text by text
                paired = "-"
        lines.append(f"| {100 * ratio:.0f}% ({ours['kept_width']}) | {mine:+.3f} | `{peer['mode']}` {theirs:+.3f} | "
                     f"{ratio_text} | {paired} | `{best['mode']}` {metric.value(best) - base:+.3f} |")
    if not lines:
        return []
    return ["## The default against the best peer", "",
            f"Increase in {metric.key} over dense ({metric.fmt(base)}) after pruning, no recovery. Peers: the published "
            f"criteria {', '.join(f'`{p}`' for p in PEERS)} (re-fit variants are lit_prune's and count as variants, "
            "not peers). `default - peer` is the paired difference on the same texts with its standard error over "
            "texts (ratio-estimator linearisation, `lit_prune.eval.perplexity.paired_nll_difference`): a difference "
            "within about two errors of 0 is not resolved by this sample.", "",
            f"| ratio (kept width) | `{default}` (default) | best peer | default / peer | default - peer | best variant |",
            "|---|---|---|---|---|---|", *lines, ""]


def _width_rows(summary: dict, ratio: float, metric: Metric) -> list[dict]:
    """The width variants the structure table shows at ``ratio``: the default, the paper's and the best one."""
    group = [r for r in summary["runs"] if r["ratio"] == ratio]
    chosen = [r for r in group if r["mode"] in (summary.get("default_criterion"), PAPER)]
    if group:
        best = metric.best(group)
        chosen += [best] if best not in chosen else []
    return chosen


def _structure_table(summary: dict, metric: Metric) -> list[str]:
    """Width beside the other structures, ratio by ratio, at equal parameter counts."""
    others = summary.get("structure_runs") or []
    if not others:
        return []
    lines = ["## Structures at equal size", "",
             "Each structure at the same number of parameters removed: unstructured masks zero as many weights as width "
             "pruning removes at that ratio, N:M patterns sit at N/M, depth removes the nearest whole number of blocks "
             "(so its size is only as close as one block allows). `removed` is 1 - params(pruned) / params(dense) "
             "with a zero weight counted as removed. Zeros are stored densely and dense kernels multiply them, so the "
             "masked models decode no faster than dense (only sparse kernels, which lit_prune does not use, could "
             "speed up 2:4). Width rows: the default criterion, the paper's selective and the best width variant. "
             f"{metric.title} and distractor similarity (SSS) after pruning -> after LoRA recovery.", "",
             f"| ratio | structure | variant | removed (%) | {metric.key} pruned -> LoRA | SSS pruned -> LoRA | "
             "decode tok/s |", "|---|---|---|---|---|---|---|"]
    sign = -1 if metric.higher_is_better else 1
    for ratio in sorted({r["ratio"] for r in summary["runs"]} | {r["ratio"] for r in others}):
        rows = _width_rows(summary, ratio, metric) + [r for r in others if r["ratio"] == ratio]
        for run in sorted(rows, key=lambda r: sign * metric.value(r)):
            pruned, recovered = run["pruned"], run.get("recovered")
            acc = metric.fmt(metric.value(run)) + (f" -> {metric.fmt(metric.value(run, 'recovered'))}" if recovered
                                                   else "")
            sss = "-" if pruned.get("sss") is None else f"{pruned['sss']:.3f}"
            if recovered and recovered.get("sss") is not None:
                sss += f" -> {recovered['sss']:.3f}"
            removed = run.get("params_removed")
            variant = run["mode"] + (f" (blocks {run['removed_blocks']})" if run.get("removed_blocks") else "")
            lines.append(f"| {100 * ratio:.1f}% | {run.get('structure', 'width')} | {variant} | "
                         f"{'-' if removed is None else f'{100 * removed:.2f}'} | {acc} | {sss} | "
                         f"{pruned.get('decode_tokens_per_s', 0):.1f} |")
    for skip in summary.get("depth_skipped") or []:
        lines.append(f"\nDepth `{skip['criterion']}` at {100 * skip['ratio']:.0f}% ({100 * skip['fraction']:.1f}% of the "
                     f"parameters) was skipped: {skip['reason']}")
    return lines + [""]


def _structure_findings(summary: dict, metric: Metric) -> list[str]:
    """Per ratio: the best width variant against the best variant of each other structure."""
    others = summary.get("structure_runs") or []
    lines = []
    for ratio in sorted({r["ratio"] for r in others}):
        width = [r for r in summary["runs"] if r["ratio"] == ratio]
        if not width:
            continue
        best_width = metric.best(width)
        default = next((r for r in width if r["mode"] == summary.get("default_criterion")), None)
        for stage in ("pruned", "recovered"):
            for structure in dict.fromkeys(r["structure"] for r in others):
                group = [r for r in others if r["ratio"] == ratio and r["structure"] == structure
                         and metric.value(r, stage) is not None]
                mine = [r for r in width if metric.value(r, stage) is not None]
                if not group or not mine:
                    continue
                best, rival = metric.best(group, stage), metric.best(mine, stage)
                mine_value, rival_value = metric.value(best, stage), metric.value(rival, stage)
                verdict = ("beat" if metric.better(mine_value, rival_value) else "tied" if mine_value == rival_value
                           else "did not beat")
                what = "after pruning" if stage == "pruned" else "after LoRA recovery"
                line = (f"At {100 * ratio:.0f}% ({100 * best['params_removed']:.1f}% of the parameters) {what}, the best "
                        f"{structure} variant `{best['mode']}` ({metric.fmt(metric.value(best, stage))}) **{verdict}** "
                        f"the best width variant `{rival['mode']}` ({metric.fmt(metric.value(rival, stage))})")
                if (stage == "pruned" and default is not None and default is not best_width
                        and metric.better(metric.value(best), metric.value(default))):
                    line += f"; it beat the default `{default['mode']}` ({metric.fmt(metric.value(default))})"
                lines.append(line + ".")
    firsts = {}
    for run in others:
        if run.get("structure") == "depth" and run.get("order"):
            firsts.setdefault(run["criterion"], run["order"][0])
    if firsts:
        lines.append("Depth criteria, the block each removes first: "
                     + ", ".join(f"`{c}` block {b}" for c, b in firsts.items()) + ".")
    return lines


def _structure_figure(summary: dict, out: Path, metric: Metric) -> dict[str, str]:
    others = summary.get("structure_runs") or []
    if not others:
        return {}
    series: dict[str, list] = defaultdict(list)
    for ratio in sorted({r["ratio"] for r in summary["runs"]}):
        for run in _width_rows(summary, ratio, metric):
            if run["mode"] in (summary.get("default_criterion"), PAPER):
                series[f"width/{run['mode']}"].append(run)
    for run in others:
        series[run["mode"]].append(run)

    def draw(ax):
        ax.axhline(metric.plot(metric.value(summary, "dense")), color="grey", linestyle=":", label="dense")
        for name, runs in series.items():
            points = sorted((100 * r["params_removed"], metric.plot(metric.value(r))) for r in runs)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)

    return {"structures": _figure(out / "fig_structures_equal_size.png", "Structures at equal size (after pruning)",
                                  "parameters removed (% of total, zeros counted)", metric.title, draw)}


def write_sweep_report(summary: dict, out: str | Path) -> Path:
    """Write ``report.md`` and the figures into ``out``; returns the report's path.

    Raises:
        ValueError: If the evaluation results carry no metric to rank by (see :func:`metric_for`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, dense = summary["runs"], summary["dense"]
    metric = metric_for(dense)
    figures = {**_figures(summary, out, metric), **_structure_figure(summary, out, metric)}
    ratios = sorted({r["ratio"] for r in runs})
    modes = list(_by_mode(runs))
    by = {(r["mode"], r["ratio"]): r for r in runs}
    scored = not metric.higher_is_better or bool(metric.value(summary, "dense"))
    lines = [f"# Pruning sweep: {summary['model']}", "",
             f"{summary['num_layers']} layers x d_ff {summary['width']}; kept width a multiple of "
             f"{summary['multiple_of']}; LoRA recovery {summary['recovery_steps']} steps per recovered variant; "
             f"wall time {summary['wall_time_s'] / 60:.1f} min. Numbers are this run's measurements.", "",
             "## Findings", "",
             *[f"- {line}" for line in _findings(summary, metric) + (_structure_findings(summary, metric) if scored
                                                                     else [])],
             "", *_versus_peers(summary, metric), *_criteria_table(summary, metric, ratios),
             *_structure_table(summary, metric),
             "## Table 2: exact pruning ratios", "", "| nominal | kept width | exact |", "|---|---|---|"]
    for ratio in ratios:
        run = next(r for r in runs if r["ratio"] == ratio)
        lines.append(f"| {100 * ratio:.0f}% | {run['kept_width']} | {100 * run['exact_ratio']:.2f}% |")

    def cell(run: dict | None, stage: str) -> str:
        if not run or not run.get(stage):
            return "-"
        traps = run[stage].get("trap_total")
        return metric.fmt(metric.value(run, stage)) + ("" if traps is None else f" / {100 * traps:.1f}")

    header = "| criterion | " + " | ".join(f"{100 * r:.0f}%" for r in ratios) + " |"
    rule = "|---|" + "---|" * len(ratios)
    has_traps = dense.get("trap_total") is not None
    suffix = " / traps (%)" if has_traps else ""
    lines += ["", f"## Table 3: {metric.title}{suffix} after pruning", "",
              f"Dense: {metric.fmt(metric.value(summary, 'dense'))}"
              + (f" / {100 * dense['trap_total']:.1f}" if has_traps else "") + ".", "", header, rule]
    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(cell(by.get((mode, r)), "pruned") for r in ratios) + " |")
    lines += ["", f"## Table 4: {metric.title}{suffix} after LoRA recovery", "", header, rule]
    for mode in modes:
        if any(by.get((mode, r), {}).get("recovered") for r in ratios):
            lines.append(f"| {mode} | " + " | ".join(cell(by.get((mode, r)), "recovered") for r in ratios) + " |")
    lines += ["", f"## Table 5: resources ({PAPER})", "",
              f"Peak memory is `{dense.get('peak_memory_method')}` over each evaluation (on CPU the whole process's "
              "resident memory, which only grows during a sweep; the weights column is exact).", "",
              "| ratio | parameters | weights (MB) | peak memory (MB) | decode tokens/s |", "|---|---|---|---|---|",
              f"| dense | {dense['parameters']:,} | {dense['weights_mb']:.2f} | {dense['peak_memory_mb']:.0f} | "
              f"{dense['decode_tokens_per_s']:.1f} |"]
    for ratio in ratios:
        if (PAPER, ratio) in by:
            pruned = by[(PAPER, ratio)]["pruned"]
            lines.append(f"| {100 * ratio:.0f}% | {pruned['parameters']:,} | {pruned['weights_mb']:.2f} | "
                         f"{pruned['peak_memory_mb']:.0f} | {pruned['decode_tokens_per_s']:.1f} |")
    if any(r["pruned"].get("sss") is not None for r in runs):
        lines += ["", "## Distractor similarity (SSS) after pruning", "", header, rule]
        for mode in modes:
            cells = [f"{by[(mode, r)]['pruned']['sss']:.3f}" if by.get((mode, r), {}).get("pruned", {}).get("sss")
                     is not None else "-" for r in ratios]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({file})" for name, file in figures.items()]
    lines.append("")
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
