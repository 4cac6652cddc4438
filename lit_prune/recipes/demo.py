"""The demo: dense vs the paper's ``selective`` vs the configured criterion, pruned and then recovered, on one model.

``python -m lit_prune demo --config configs/demo.yaml`` runs :func:`run_demo` (a method of
:class:`~lit_prune.trainer.LitPruneTrainer` for LightningCLI); from Python, ``run_demo(trainer, model,
datamodule)`` with a ``LitPruneTrainer`` whose callbacks capture and prune.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info

from lit_prune.callbacks.prune import SelectivityPruneCallback
from lit_prune.data.datamodule import PruneDataModule
from lit_prune.eval.evaluator import evaluate
from lit_prune.eval.report import print_comparison, write_json
from lit_prune.loading import preloaded
from lit_prune.module import PrunableCausalLM
from lit_prune.pruning.engine import PruneSpec, make_plan
from lit_prune.recipes.common import _callback, capture_statistics, fresh_copy

if TYPE_CHECKING:
    from lit_prune.trainer import LitPruneTrainer

__all__ = ["run_demo"]


def run_demo(trainer: LitPruneTrainer, model: PrunableCausalLM, datamodule: PruneDataModule,
             report_dir: str | None = None) -> list[dict]:
    """Dense vs the paper's ``selective`` vs the configured criterion, pruned and recovered, on one model.

    The configured callbacks capture and prune; the paper's ``selective`` at the same ratio and alignment is
    planned on a second, prompt-only capture of the same texts (the paper's setting) and evaluated beside it,
    so the table shows what the criterion changes.

    Args:
        model: The dense model (its ``export_dir`` receives the recovered checkpoint).
        datamodule: Capture, fine-tune and evaluation data.
        report_dir: Where the comparison JSON goes (default: ``trainer.default_root_dir``).

    Returns:
        The evaluation results (dense, paper's selective, the configured criterion, and it + LoRA).

    Raises:
        ValueError: If the Trainer has no SelectivityPruneCallback.
    """
    prune = _callback(trainer, SelectivityPruneCallback)
    if prune is None:
        raise ValueError("`demo` needs a SelectivityPruneCallback in `trainer.callbacks`")
    phases: dict[str, float] = {}
    start = time.perf_counter()
    model.evaluator.settings.label = "dense"
    dense = evaluate(trainer.variant_trainer(), model, datamodule)
    phases["evaluate dense"] = time.perf_counter() - start

    results = [dense]
    if prune.spec != PruneSpec.paper(prune.ratio, multiple_of=prune.multiple_of, seed=prune.spec.seed):
        start = time.perf_counter()
        paper = PruneSpec.paper(prune.ratio, multiple_of=prune.multiple_of, seed=prune.spec.seed)
        stats = capture_statistics(trainer, model, datamodule, [paper], Path(trainer.default_root_dir) / "demo-paper")[
            "prompt"]
        # Beside the other evaluations (the model's output_dir), under its own label.
        with preloaded(model.model, model.tokenizer):  # still dense: copy it rather than read the files again
            baseline = fresh_copy(model, "selective (paper)",
                                  Path(model.evaluator.settings.output_dir or Path(trainer.default_root_dir) / "eval"))
        result = make_plan(baseline.model, stats, paper, provenance={"model": model.model_source})
        result.apply(baseline.model)
        baseline.set_prune_plan(result.plan)
        results.append(dict(evaluate(trainer.variant_trainer(), baseline, datamodule),
                            label=f"pruned {result.plan.exact_ratio:.1%} (selective, paper)"))
        del baseline
        phases["paper's selective: capture + prune + evaluate"] = time.perf_counter() - start

    start = time.perf_counter()
    model.evaluator.settings.label = None
    pruned = evaluate(trainer, model, datamodule)  # the callbacks capture and slice in setup
    plan = model.prune_plan
    results.append(dict(pruned, label=f"pruned {plan.exact_ratio:.1%} ({plan.label})"))
    phases[f"{plan.label}: capture + prune + evaluate"] = time.perf_counter() - start

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)  # already pruned: LoRA recovery, merge, export
    phases["LoRA recovery + export"] = time.perf_counter() - start
    start = time.perf_counter()
    model.evaluator.settings.label = None
    recovered = evaluate(trainer.variant_trainer(), model, datamodule)
    results.append(dict(recovered, label=f"{plan.label} + LoRA ({trainer.global_step} steps)"))
    phases["evaluate recovered"] = time.perf_counter() - start

    if trainer.is_global_zero:
        text = print_comparison(results, title="lit_prune demo: dense vs pruned vs recovered")
        out = Path(report_dir or trainer.default_root_dir)
        write_json({"results": results, "phases_s": phases, "export": str(model.exported_to),
                    "table": text}, out / "demo.json")
        rank_zero_info(f"phases (s): {', '.join(f'{k} {v:.0f}' for k, v in phases.items())}; "
                       f"recovered model in {model.exported_to}; report {out / 'demo.json'}")
    return results

