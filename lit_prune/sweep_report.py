"""The sweep's Markdown report (the criteria table, the paper's Tables 2-5 for the swept model) and its figures.

The paper's own setting is the variant ``selective/paper`` (selectivity on per-prompt means of prompt tokens);
the other rows are criteria on the sweep's capture (prompt + response tokens by default, per-token statistics).
Figures: accuracy of every criterion vs ratio, relative accuracy loss (Fig. 1), relative gain after fine-tuning
(Fig. 2), selective vs random (Fig. 3), selective vs reverse (Fig. 4), distractor similarity by criterion
(Fig. 5), layer-wise counts of target- vs distractor-selective neurons (Fig. 6) and trap rate vs ratio.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["accuracy_key", "write_sweep_report"]

log = logging.getLogger(__name__)


def accuracy_key(result: dict) -> str:
    """The task accuracy a result carries: GSM8K exact match, else HumanEval pass@1."""
    return "exact_match" if result.get("exact_match") is not None else "pass_at_1"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _by_mode(runs: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for run in runs:
        grouped[run["mode"]].append(run)
    return grouped


PAPER = "selective/paper"


def _relative_loss(base: float, value: float) -> float | None:
    return None if not base else 100.0 * (base - value) / base


def _mean_random(runs: list[dict], stage: str, key: str) -> dict[float, float]:
    values = defaultdict(list)
    for run in runs:
        if run["criterion"] == "random" and not run.get("refit") and run.get(stage) and run[stage].get(key) is not None:
            values[run["ratio"]].append(run[stage][key])
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


def _figures(summary: dict, out: Path) -> dict[str, str]:
    runs, dense = summary["runs"], summary["dense"]
    key = accuracy_key(dense)
    base = dense[key]
    modes = _by_mode(runs)
    figures = {}

    def loss_curves(ax):
        for mode, mode_runs in modes.items():
            x, y = _series(mode_runs, "pruned", key)
            ax.plot(x, [_relative_loss(base, v) for v in y], marker="o", label=mode)

    figures["fig1"] = _figure(out / "fig1_relative_accuracy_loss.png", "Relative accuracy loss after pruning (Eq. 3)",
                              "nominal pruning ratio (%)", "relative loss (%)", loss_curves)

    def gain_curves(ax):
        for mode, mode_runs in modes.items():
            points = sorted((r["ratio"], r["pruned"][key], r["recovered"][key]) for r in mode_runs if r.get("recovered"))
            if points:
                ax.plot([100 * p[0] for p in points],
                        [100.0 * (p[2] - p[1]) / p[1] if p[1] else float("nan") for p in points],
                        marker="o", label=mode)

    figures["fig2"] = _figure(out / "fig2_relative_gain.png", "Relative gain after LoRA recovery (Eq. 4)",
                              "nominal pruning ratio (%)", "relative gain (%)", gain_curves)

    def versus(other: str):
        def draw(ax):
            ax.axhline(100 * base, color="grey", linestyle=":", label="dense")
            for mode, mode_runs in modes.items():
                if mode == PAPER or mode.startswith(other):
                    x, y = _series(mode_runs, "pruned", key)
                    ax.plot(x, [100 * v for v in y], marker="o", label=mode)
        return draw

    figures["fig3"] = _figure(out / "fig3_selective_vs_random.png", "Selective vs random pruning",
                              "nominal pruning ratio (%)", f"{key} (%)", versus("random"))
    figures["fig4"] = _figure(out / "fig4_selective_vs_reverse.png", "Selective vs reverse pruning",
                              "nominal pruning ratio (%)", f"{key} (%)", versus("reverse"))

    def similarity(ax):
        for mode, mode_runs in modes.items():
            x, y = _series(mode_runs, "pruned", "sss")
            if x:
                ax.plot(x, y, marker="o", label=mode)

    figures["fig5"] = _figure(out / "fig5_distractor_similarity.png", "Distractor semantic similarity to the original",
                              "nominal pruning ratio (%)", "SSS (mean of BERTScore QnA, SBERT dialogue)", similarity)

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

    figures["traps"] = _figure(out / "fig_trap_rate.png", "Trap rate after pruning (Type 1 + Type 2)",
                               "nominal pruning ratio (%)", "traps (%)", traps)
    return figures


def _findings(summary: dict) -> list[str]:
    """Plain statements of what this run found, including where it disagrees with the paper."""
    runs, dense = summary["runs"], summary["dense"]
    key = accuracy_key(dense)
    selective = {r["ratio"]: r["pruned"][key] for r in runs if r["mode"] == PAPER}
    random_mean = _mean_random(runs, "pruned", key)
    reverse = {r["ratio"]: r["pruned"][key] for r in runs if r["mode"] == "reverse"}
    control = {r["ratio"]: r["pruned"][key] for r in runs if r["mode"] == "target_mean"}
    lines = [f"Dense model: {key} {_pct(dense[key])}%, traps {_pct(dense.get('trap_total'))}%."]
    if not dense[key]:
        lines.append("The dense model scores 0 on its task, so the comparisons below say nothing about the method.")
        return lines
    lines += _default_findings(summary, key)
    worse_than_random = [r for r in selective if r in random_mean and selective[r] < random_mean[r]]
    if worse_than_random:
        lines.append("Selective pruning scored **below the mean of random pruning** at "
                     + ", ".join(f"{100 * r:.0f}%" for r in sorted(worse_than_random))
                     + " (the paper reports selective above random at every ratio).")
    elif selective and random_mean:  # both were swept: otherwise there is nothing to compare
        lines.append("Selective pruning scored at or above the mean of random pruning at every ratio, as in the paper.")
    collapsed = sorted(r for r, v in reverse.items() if v <= 0.05 * max(dense[key], 1e-9))
    if collapsed:
        lines.append(f"Reverse pruning collapsed (<= 5% of dense accuracy) from {100 * collapsed[0]:.0f}% on "
                     "(the paper: collapse near 10%).")
    elif reverse:
        lines.append("Reverse pruning did not collapse within the swept ratios (the paper: collapse near 10%).")
    better_control = sorted(r for r in selective if r in control and control[r] > selective[r])
    if better_control:
        lines.append("The `target_mean` control (rank by mean |h| on target prompts only) beat selectivity at "
                     + ", ".join(f"{100 * r:.0f}%" for r in better_control) + ".")
    return lines


def _default_findings(summary: dict, key: str) -> list[str]:
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
            if not run.get(stage):
                continue
            mine = run[stage][key]
            better = [(r["mode"], r[stage][key]) for r in runs if r["ratio"] == ratio and r["mode"] != default
                      and r.get(stage) and r[stage][key] > mine]
            if better:
                best = max(better, key=lambda item: item[1])
                beaten.append(f"{100 * ratio:.0f}% ({len(better)} variant(s), best {best[0]} {_pct(best[1])} vs "
                              f"{_pct(mine)})")
        what = "after pruning" if stage == "pruned" else "after LoRA recovery"
        if beaten:
            lines.append(f"The default criterion `{default}` was **beaten {what}** at " + "; ".join(beaten) + ".")
        elif any(r.get(stage) for r in ours.values()):
            lines.append(f"The default criterion `{default}` was at least as good as every other variant {what} at "
                         "every ratio.")
    return lines


def _criteria_table(summary: dict, key: str, ratios: list[float]) -> list[str]:
    """Per ratio and variant: accuracy before -> after LoRA, traps, distractor similarity and planning time."""
    runs = summary["runs"]
    lines = ["## Criteria", "",
             f"{key} (%) after pruning -> after LoRA recovery ({summary['recovery_steps']} steps), traps after pruning "
             "(%), distractor similarity (SSS) after pruning -> after recovery, and the criterion's time: capture of "
             "the statistics it needs (shared by every variant on the same capture; listed once per capture) + "
             "scoring/selection + re-fit. Bold: best accuracy after pruning at that ratio.", ""]
    for capture, seconds in sorted({(r["capture"], r.get("capture_seconds")) for r in runs}, key=str):
        if seconds is not None:
            lines.append(f"- capture on {capture} tokens: {seconds:.1f} s")
    lines.append("")
    for ratio in ratios:
        group = [r for r in runs if r["ratio"] == ratio]
        best = max(r["pruned"][key] for r in group)
        lines += [f"### {100 * ratio:.0f}% (kept width {group[0]['kept_width']})", "",
                  f"| variant | {key} pruned -> LoRA | traps | SSS pruned -> LoRA | select + re-fit (s) |",
                  "|---|---|---|---|---|"]
        for run in sorted(group, key=lambda r: -r["pruned"][key]):
            pruned, recovered = run["pruned"], run.get("recovered")
            acc = _pct(pruned[key])
            acc = f"**{acc}**" if pruned[key] == best else acc
            after = f" -> {_pct(recovered[key])}" if recovered else ""
            sss = "-" if pruned.get("sss") is None else f"{pruned['sss']:.3f}"
            if recovered and recovered.get("sss") is not None:
                sss += f" -> {recovered['sss']:.3f}"
            timing = run.get("seconds") or {}
            lines.append(f"| {run['mode']} | {acc}{after} | {_pct(pruned.get('trap_total'))} | {sss} | "
                         f"{sum(timing.values()):.2f} |")
        lines.append("")
    return lines


def write_sweep_report(summary: dict, out: str | Path) -> Path:
    """Write ``report.md`` and the figures into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(summary, out)
    runs, dense = summary["runs"], summary["dense"]
    key = accuracy_key(dense)
    ratios = sorted({r["ratio"] for r in runs})
    modes = list(_by_mode(runs))
    by = {(r["mode"], r["ratio"]): r for r in runs}
    lines = [f"# Pruning sweep: {summary['model']}", "",
             f"{summary['num_layers']} layers x d_ff {summary['width']}; kept width a multiple of "
             f"{summary['multiple_of']}; LoRA recovery {summary['recovery_steps']} steps per recovered variant; "
             f"wall time {summary['wall_time_s'] / 60:.1f} min. Numbers are this run's measurements.", "",
             "## Findings", "", *[f"- {line}" for line in _findings(summary)], "",
             *_criteria_table(summary, key, ratios),
             "## Table 2: exact pruning ratios", "", "| nominal | kept width | exact |", "|---|---|---|"]
    for ratio in ratios:
        run = next(r for r in runs if r["ratio"] == ratio)
        lines.append(f"| {100 * ratio:.0f}% | {run['kept_width']} | {100 * run['exact_ratio']:.2f}% |")
    header = "| criterion | " + " | ".join(f"{100 * r:.0f}%" for r in ratios) + " |"
    rule = "|---|" + "---|" * len(ratios)
    lines += ["", f"## Table 3: {key} (%) / traps (%) after pruning", "",
              f"Dense: {_pct(dense[key])} / {_pct(dense.get('trap_total'))}.", "", header, rule]
    for mode in modes:
        cells = [f"{_pct(by[(mode, r)]['pruned'][key])} / {_pct(by[(mode, r)]['pruned'].get('trap_total'))}"
                 if (mode, r) in by else "-" for r in ratios]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", f"## Table 4: {key} (%) / traps (%) after LoRA recovery", "", header, rule]
    for mode in modes:
        if any(by.get((mode, r), {}).get("recovered") for r in ratios):
            cells = [f"{_pct(by[(mode, r)]['recovered'][key])} / {_pct(by[(mode, r)]['recovered'].get('trap_total'))}"
                     if by.get((mode, r), {}).get("recovered") else "-" for r in ratios]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
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
    lines += ["", "## Distractor similarity (SSS) after pruning", "", header, rule]
    for mode in modes:
        cells = [f"{by[(mode, r)]['pruned']['sss']:.3f}" if by.get((mode, r), {}).get("pruned", {}).get("sss")
                 is not None else "-" for r in ratios]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({file})" for name, file in figures.items()]
    lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
