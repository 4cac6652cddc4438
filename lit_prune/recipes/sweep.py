"""The sweep: every width criterion, and optionally weight-sparsity masks and depth, at every ratio, side by side.

``python -m lit_prune sweep --config configs/sweep-toy.yaml`` runs :func:`run_sweep` (a method of
:class:`~lit_prune.trainer.LitPruneTrainer` for LightningCLI): capture once per capture setting, then for every
ratio and criterion prune a fresh copy of the dense model, evaluate it, recover it with LoRA and evaluate it again;
a Markdown report with the criteria table, the structures at equal size, the paper's Tables 2-5 and PNG figures
(:mod:`lit_prune.eval.sweep_report`). Each variant runs on a fresh ``Trainer`` built from the sweep's own arguments
(without its callbacks, logger and checkpointing), so no state leaks from one variant to the next.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info

from lit_prune.callbacks.capture import ActivationCaptureCallback
from lit_prune.callbacks.prune import SelectivityPruneCallback
from lit_prune.data.batching import labelled_batches
from lit_prune.data.datamodule import PruneDataModule
from lit_prune.eval.evaluator import evaluate
from lit_prune.eval.report import write_json
from lit_prune.eval.resources import compression_ratio
from lit_prune.loading import preloaded
from lit_prune.module import PrunableCausalLM
from lit_prune.pruning.depth import DepthSpec, make_depth_plan, width_param_fraction
from lit_prune.pruning.engine import CAPTURE_TOKENS, PruneSpec, make_plan
from lit_prune.pruning.importance import CRITERIA
from lit_prune.pruning.plan import kept_width, validate_ratio
from lit_prune.pruning.sparsity import METHODS as SPARSITY_METHODS
from lit_prune.pruning.sparsity import SparsityResult, SparsitySpec, measure_sparsity, prune_model
from lit_prune.pruning.stats import NeuronStats
from lit_prune.pruning.swiglu import find_swiglu_mlps
from lit_prune.recipes.common import _callback, capture_statistics, fresh_copy

if TYPE_CHECKING:
    from lit_prune.trainer import LitPruneTrainer

__all__ = ["equal_size_sparsity", "params_removed", "run_sweep"]


def run_sweep(
    trainer: LitPruneTrainer,
    model: PrunableCausalLM,
    datamodule: PruneDataModule,
    ratios: list[float] | None = None,
    criteria: list[str] | None = None,
    random_seeds: list[int] | None = None,
    recover: list[str] | None = None,
    recover_ratios: list[float] | None = None,
    refit_criteria: list[str] | None = None,
    paper: bool = True,
    capture: str = "response",
    recovery_steps: int = 40,
    report_dir: str | None = None,
    sparsity_methods: list[str] | None = None,
    sparsity_patterns: list[str] | None = None,
    sparsity_targets: list[str] | None = None,
    depth_criteria: list[str] | None = None,
    depth_keep_ends: bool = True,
    modes: list[str] | None = None,
    recover_modes: list[str] | None = None,
) -> dict:
    """Every width criterion, and optionally weight-sparsity masks and depth, at every ratio: prune, evaluate,
    recover and report side by side (one capture per capture setting).

    Args:
        model: The dense model; every variant is a fresh copy of it.
        datamodule: Capture, fine-tune and evaluation data.
        ratios: Nominal pruning ratios (default 5%, 10%, 20%, 35%, 50%).
        criteria: Criteria to compare (default: every one in :data:`CRITERIA`), planned with the prune
            callback's ``multiple_of``, on ``capture`` tokens with per-token aggregation.
        random_seeds: Seeds of ``random`` (the paper: 42 and 33).
        recover: Variant names (e.g. ``compensated``, ``selective/paper``, ``random/seed42``) whose pruned models
            get LoRA recovery; default every variant.
        recover_ratios: Ratios at which those variants are recovered (default: every ratio).
        refit_criteria: Criteria that also run with the least-squares re-fit of ``W_down`` (``<name>+refit``).
        paper: Add the paper's setting (``selective`` on per-prompt means of prompt tokens) as
            ``selective/paper``.
        capture: Tokens the criteria's statistics are captured on: ``response`` or ``prompt``.
        recovery_steps: LoRA steps per recovered variant.
        report_dir: Folder of the report, ``sweep.json`` and figures (default: ``<trainer.default_root_dir>/sweep``,
            which always holds the statistics, reference outputs and per-variant evaluations).
        sparsity_methods: Weight-sparsity methods (``magnitude``, ``wanda``, ``sparsegpt``, ``ria``) to set beside
            width pruning at equal size (default: none). Each is calibrated on the target capture texts (the
            sweep's ``capture`` tokens), as :class:`~lit_prune.callbacks.WeightSparsityCallback` does by default.
        sparsity_patterns: ``unstructured`` (default) and/or N:M patterns (``2:4``, ``4:8``). Unstructured runs at
            every ratio with as many zeros as width pruning removes weights there (:func:`equal_size_sparsity`);
            an N:M pattern runs once, at N/M, and is listed under the ratio ``N/M`` when that is swept. A zero
            counts as removed; dense kernels do not get faster from zeros.
        sparsity_targets: Linear names the masks go on (default: the MLP projections ``gate_proj``, ``up_proj``,
            ``down_proj``, the weights width pruning removes, so the two compare the same matrices; list
            ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` too to spread the same number of zeros over every
            decoder linear, as the NSA study does).
        depth_criteria: Depth criteria (``block_influence``, ``ppl``, ``taylor_block``) to set beside width at
            equal size (default: none): at every ratio the block count nearest to the fraction of the
            parameters width pruning removes there (``width_param_fraction``), scored once per criterion on
            the target capture texts (labels on the responses). A ratio that rounds to no block (or to more
            than the candidates) is skipped and listed in the report.
        depth_keep_ends: Keep the first and last blocks out of the candidates (Shortened LLaMA's heuristic; the
            callback's default).
        modes: Deprecated name of ``criteria``.
        recover_modes: Deprecated name of ``recover``.

    Returns:
        Everything the report shows (also written as ``sweep.json``).

    Raises:
        ValueError: For a bad ratio, criterion, capture setting, step count, sparsity method, pattern or target,
            or depth criterion (before any capture).
    """
    criteria = list(criteria or modes or CRITERIA)
    recover = recover if recover is not None else recover_modes
    ratios = [validate_ratio(r) for r in (ratios or [0.05, 0.10, 0.20, 0.35, 0.50])]
    random_seeds = list(random_seeds or [42, 33])
    refit_criteria = list(refit_criteria or [])
    if capture not in CAPTURE_TOKENS:
        raise ValueError(f"`capture` must be one of {CAPTURE_TOKENS}; got {capture!r}")
    for name in criteria + refit_criteria:
        if name not in CRITERIA:
            raise ValueError(f"`criteria`/`refit_criteria` entries must be in {CRITERIA}; got {name!r}")
    always = [n for n in refit_criteria if PruneSpec(0.5, n).refits]
    if always:
        raise ValueError(f"`refit_criteria` {always} re-fit already (they are in `criteria`'s rows); remove them")
    if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) or recovery_steps < 1:
        raise ValueError(f"`recovery_steps` must be an integer >= 1; got {recovery_steps!r}")
    prune = _callback(trainer, SelectivityPruneCallback)
    multiple_of = prune.multiple_of if prune else 128
    variants: list[tuple[str, float, PruneSpec]] = []
    for ratio in ratios:
        for name in criteria:
            for seed in (random_seeds if name == "random" else [42]):
                spec = PruneSpec(ratio, name, multiple_of, seed, "token", capture)
                variants.append((spec.label + (f"/seed{seed}" if name == "random" else ""), ratio, spec))
        for name in refit_criteria:
            spec = PruneSpec(ratio, name, multiple_of, 42, "token", capture, refit=True)
            variants.append((spec.label, ratio, spec))
        if paper:
            variants.append(("selective/paper", ratio, PruneSpec.paper(ratio, multiple_of=multiple_of)))
    names = list(dict.fromkeys(n for n, _, _ in variants))
    recover_ratios = ratios if recover_ratios is None else [validate_ratio(r) for r in recover_ratios]
    stray = [r for r in recover_ratios if r not in ratios]
    if stray:
        raise ValueError(f"`recover_ratios` {stray} are not among `ratios` {ratios}")
    sparse_variants = _sparsity_variants(model.model, ratios, multiple_of, sparsity_methods, sparsity_patterns,
                                         sparsity_targets)
    depth_variants, depth_skipped = _depth_variants(model.model, ratios, multiple_of, depth_criteria,
                                                    depth_keep_ends)
    names += [n for n in dict.fromkeys(n for n, _, _ in sparse_variants + depth_variants) if n not in names]
    if recover is not None:
        unknown = [n for n in recover if n not in names]
        if unknown:
            raise ValueError(f"`recover` names {unknown}, which are not variants of this sweep; they are {names}")
    work = Path(trainer.default_root_dir) / "sweep"  # statistics, reference outputs, per-variant evaluations
    out = Path(report_dir) if report_dir else work  # report.md, sweep.json and the figures
    # Every variant is a fresh module: copies of the dense weights and tokenizer, not a re-read of the files
    # (SmolLM2's GGUF takes ~40 s to de-quantise; 56 variants would spend 37 min on it).
    with preloaded(model.model, model.tokenizer):
        started = time.perf_counter()
        for _, _, spec in variants:  # fail before any capture if a ratio cannot be sliced
            spec.check_model(model.model)
        recover = names if recover is None else list(recover)
        capture_started = time.perf_counter()
        stats = capture_statistics(trainer, model, datamodule, [s for _, _, s in variants], work)
        if any(s is None for s in stats.values()):
            raise ValueError(f"the sweep's model {model.model_name_or_path!r} is already pruned (or the Trainer resumes "
                             "from a checkpoint): sweep the dense model")
        capture_seconds = time.perf_counter() - capture_started

        runs: list[dict] = []
        dense_module = fresh_copy(model, "dense", work / "eval")
        dense = evaluate(trainer.variant_trainer(), dense_module, datamodule)
        del dense_module
        total = len(variants) + len(sparse_variants) + len(depth_variants)
        for index, (name, ratio, spec) in enumerate(variants):
            rank_zero_info(f"sweep [{index + 1}/{total}] {name} at {ratio:.0%}")
            variant = fresh_copy(model, f"{name}@{ratio:.2f}", work / "eval")
            result = make_plan(variant.model, stats[spec.capture], spec, provenance={"model": model.model_source})
            result.apply(variant.model)
            variant.set_prune_plan(result.plan)
            pruned = evaluate(trainer.variant_trainer(), variant, datamodule)
            plan = result.plan
            run = {"structure": "width", "mode": name, "criterion": spec.criterion, "seed": spec.seed, "aggregation": spec.aggregation,
                   "capture": spec.capture, "refit": spec.refits, "ratio": ratio, "exact_ratio": plan.exact_ratio,
                   "kept_width": plan.kept_width, "seconds": result.seconds,
                   "capture_seconds": stats[spec.capture].metadata.get("capture_seconds"),
                   "pruned": pruned, "params_removed": params_removed(pruned, dense)}
            if name in recover and ratio in recover_ratios:
                run["recovered"] = _recover(trainer, variant, f"{name}+lora@{ratio:.2f}", datamodule, recovery_steps)
            runs.append(run)
            del variant
        structure_runs: list[dict] = []
        calibration = None
        for index, (name, ratio, sparse) in enumerate(sparse_variants, start=len(variants)):
            rank_zero_info(f"sweep [{index + 1}/{total}] {name} ({sparse.label}) at the size of width {ratio:.0%}")
            if calibration is None:
                template = _callback(trainer, ActivationCaptureCallback) or ActivationCaptureCallback()
                calibration = [(ids, mask) for ids, mask, _ in labelled_batches(
                    model.tokenizer, datamodule.capture_texts(model.tokenizer)["target"], capture,
                    template.max_length, template.batch_size)[0]]
            variant = fresh_copy(model, f"{name}@{ratio:.2f}", work / "eval")
            variant.record_modification(sparse.label)
            result = prune_model(variant.model, calibration, sparse, provenance={"model": model.model_source})
            pruned = evaluate(trainer.variant_trainer(), variant, datamodule)
            run = {"structure": "sparsity", "mode": name, "method": sparse.method, "pattern": sparse.pattern,
                   "sparsity": sparse.sparsity, "ratio": ratio, "seconds": result.seconds,
                   "measured": measure_sparsity(variant.model, sparse.targets, sparse.n_m),
                   "pruned": pruned, "params_removed": params_removed(pruned, dense)}
            if name in recover and ratio in recover_ratios:
                run["recovered"] = _recover(trainer, variant, f"{name}+lora@{ratio:.2f}", datamodule, recovery_steps,
                                                 masks=result)
                run["measured_recovered"] = measure_sparsity(variant.model, sparse.targets, sparse.n_m)
            structure_runs.append(run)
            del variant
        structure_runs += _depth_runs(trainer, model, datamodule, depth_variants, capture, dense, work, recover,
                                           recover_ratios, recovery_steps, start=len(variants) + len(sparse_variants),
                                           total=total)
        reference = stats.get("prompt") or next(iter(stats.values()))
        summary = {"dense": dense, "runs": runs, "multiple_of": multiple_of, "width": reference.width,
                   "num_layers": reference.num_layers, "recovery_steps": recovery_steps,
                   "model": model.model_name_or_path, "wall_time_s": time.perf_counter() - started,
                   "capture_s": capture_seconds, "layer_counts": _layer_counts(reference),
                   "default_criterion": prune.spec.label if prune else None, "structure_runs": structure_runs,
                   "depth_skipped": depth_skipped}
        if trainer.is_global_zero:
            from lit_prune.eval.sweep_report import write_sweep_report

            write_json(summary, out / "sweep.json")
            report = write_sweep_report(summary, out)
            rank_zero_info(f"sweep finished in {summary['wall_time_s'] / 60:.1f} min; report {report}")
    return summary

def _depth_runs(trainer: LitPruneTrainer, model, datamodule, depth_variants, capture, dense, work, recover, recover_ratios,
                recovery_steps, start: int, total: int) -> list[dict]:
    """Remove blocks from fresh copies (scores computed once per criterion), evaluate, recover."""
    runs, scores, batches = [], {}, None
    for index, (name, ratio, spec) in enumerate(depth_variants, start=start):
        rank_zero_info(f"sweep [{index + 1}/{total}] {name} at the size of width {ratio:.0%}")
        if batches is None:
            template = _callback(trainer, ActivationCaptureCallback) or ActivationCaptureCallback()
            batches = labelled_batches(model.tokenizer, datamodule.capture_texts(model.tokenizer)["target"],
                                       capture, template.max_length, template.batch_size)[0]
        variant = fresh_copy(model, f"{name}@{ratio:.2f}", work / "eval")
        begin = time.perf_counter()
        plan = make_depth_plan(variant.model, batches, spec, provenance={"model": model.model_source},
                               scores=scores.get(spec.criterion))
        scores.setdefault(spec.criterion, plan.scores)
        seconds = time.perf_counter() - begin
        variant.record_modification(plan.label)
        plan.apply(variant.model)
        variant.set_depth_plan(plan)
        pruned = evaluate(trainer.variant_trainer(), variant, datamodule)
        run = {"structure": "depth", "mode": name, "criterion": spec.criterion, "ratio": ratio,
               "removed_blocks": plan.removed_blocks, "order": plan.provenance.get("order"),
               "scores": plan.scores, "seconds": {"score": seconds}, "pruned": pruned,
               "params_removed": params_removed(pruned, dense)}
        if name in recover and ratio in recover_ratios:
            run["recovered"] = _recover(trainer, variant, f"{name}+lora@{ratio:.2f}", datamodule, recovery_steps)
        runs.append(run)
        del variant
    return runs

def _recover(trainer: LitPruneTrainer, variant: PrunableCausalLM, label: str, datamodule, steps: int,
             masks: SparsityResult | None = None) -> dict:
    """LoRA-recover ``variant`` for ``steps`` steps, merge (re-applying ``masks`` to the merged weights: the
    update ``B A`` is dense) and evaluate it again."""
    variant.evaluator.settings = dataclasses.replace(variant.evaluator.settings, label=label)
    trainer.variant_trainer(max_steps=steps, max_epochs=None, val_check_interval=None, limit_val_batches=0,
                         enable_progress_bar=False).fit(variant, datamodule=datamodule)
    merged = variant.merged_model()
    if masks is not None:
        masks.apply(merged)
    return evaluate(trainer.variant_trainer(), variant, datamodule)


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def params_removed(result: dict, dense: dict) -> float:
    """Fraction of the dense model's parameters a variant removed, a zero weight counted as removed (the LRM study's
    ``1 - params(pruned) / params(dense)``, on non-zero parameters), from two evaluation results."""
    return compression_ratio(dense["parameters"] - dense.get("zero_parameters", 0),
                             result["parameters"] - result.get("zero_parameters", 0))


def equal_size_sparsity(model, ratio: float, multiple_of: int, targets) -> float:
    """Unstructured sparsity of the ``targets`` linears that zeroes as many weights as width pruning at ``ratio``
    removes: ``(d_ff - kept_width) * (gate.in + up.in + down.out)`` per layer over the targeted weights (with the
    default MLP targets this is the plan's exact ratio).

    Raises:
        ValueError: If the targets hold fewer weights than width pruning removes.
    """
    blocks = find_swiglu_mlps(model)
    removed = sum((b.width - kept_width(b.width, ratio, multiple_of))
                  * (b.gate_proj.in_features + b.up_proj.in_features + b.down_proj.out_features) for b in blocks)
    targeted = sum(linear.weight.numel() for linear in SparsitySpec("magnitude", targets=targets).check_model(model)
                   .values())
    if removed >= targeted:
        raise ValueError(f"`sparsity_targets` {list(targets)} hold {targeted:,} weights, fewer than the {removed:,} width "
                         f"pruning removes at ratio {ratio}; target more linears")
    return removed / targeted


def _sparsity_variants(model, ratios, multiple_of, methods, patterns, targets) -> list[tuple[str, float, SparsitySpec]]:
    """``(name, ratio, spec)`` of the sweep's weight-sparsity axis, validated (before any capture)."""
    if not methods:
        if patterns or targets:
            raise ValueError("`sparsity_patterns`/`sparsity_targets` are set but `sparsity_methods` is empty; name the "
                             f"methods to sweep ({SPARSITY_METHODS})")
        return []
    targets = tuple(targets) if targets else MLP_PROJECTIONS
    variants = []
    for method in methods:
        for pattern in patterns or ["unstructured"]:
            spec = SparsitySpec(method, pattern, targets=targets)  # validates method and pattern
            if spec.n_m is None:
                variants += [(f"sparsity/{method}", ratio, SparsitySpec(
                    method, targets=targets, sparsity=equal_size_sparsity(model, ratio, multiple_of, targets)))
                    for ratio in ratios]
            else:
                spec.check_model(model)  # M must divide every targeted input width
                variants.append((f"sparsity/{method}-{spec.pattern}", spec.sparsity, spec))
    return variants


def _depth_variants(model, ratios, multiple_of, criteria, keep_ends) -> tuple[list[tuple[str, float, DepthSpec]],
                                                                             list[dict]]:
    """``(name, ratio, spec)`` of the sweep's depth axis at the sizes of the width ratios, and the ratios skipped
    because they round to no block (or to more blocks than the candidates); an unknown criterion fails here."""
    variants, skipped = [], []
    for criterion in criteria or []:
        DepthSpec(num_blocks=1, criterion=criterion)  # validates the name before any capture
        for ratio in ratios:
            fraction = width_param_fraction(model, ratio, multiple_of)
            try:
                spec = DepthSpec(ratio=fraction, criterion=criterion, keep_first=keep_ends, keep_last=keep_ends)
                spec.check_model(model)
            except ValueError as error:
                skipped.append({"criterion": criterion, "ratio": ratio, "fraction": fraction, "reason": str(error)})
                continue
            variants.append((f"depth/{criterion}", ratio, spec))
    return variants, skipped


def _layer_counts(stats: NeuronStats) -> dict:
    """Per layer: neurons more active on target prompts (S > 0) and on distractor prompts (S < 0), plus the
    strongly selective ones (|S| > 0.5), for the paper's Fig. 6."""
    from lit_prune.pruning.importance import selectivity

    scores = selectivity(stats)
    return {"target": (scores > 0).sum(1).tolist(), "distractor": (scores < 0).sum(1).tolist(),
            "target_strong": (scores > 0.5).sum(1).tolist(), "distractor_strong": (scores < -0.5).sum(1).tolist()}
