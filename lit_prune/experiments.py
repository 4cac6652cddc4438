"""Experiments as Trainer methods, so LightningCLI exposes them as subcommands next to ``fit`` and ``test``:

* ``python -m lit_prune demo --config configs/demo.yaml``: evaluate the dense model, prune it (capture and
  slicing in the configured callbacks), evaluate, recover with LoRA, export, evaluate again; one table.
* ``python -m lit_prune sweep --config configs/sweep-toy.yaml``: capture once, then for every ratio and
  criterion prune a fresh copy, evaluate, recover some with LoRA and evaluate again; a Markdown report with
  the paper's Tables 2-5 and PNG figures (see ``lit_prune.sweep_report``).

Each variant runs on a fresh ``Trainer`` built from this one's arguments (without its callbacks, logger
and checkpointing), so no state leaks from one variant to the next.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_prune.callbacks.capture import ActivationCaptureCallback
from lit_prune.callbacks.prune import SelectivityPruneCallback
from lit_prune.data.datamodule import PruneDataModule
from lit_prune.module import PrunableCausalLM
from lit_prune.pruning.importance import CRITERIA
from lit_prune.pruning.plan import kept_width, make_plan, validate_ratio
from lit_prune.pruning.stats import AGGREGATIONS, NeuronStats
from lit_prune.report import print_comparison, write_json

__all__ = ["LitPruneTrainer"]

log = logging.getLogger(__name__)


class LitPruneTrainer(L.Trainer):
    """A Lightning ``Trainer`` with the project's experiments as methods (``demo``, ``sweep``)."""

    def __init__(self, *args, **kwargs) -> None:
        bound = inspect.signature(L.Trainer.__init__).bind(self, *args, **kwargs)
        self._init_arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        super().__init__(*args, **kwargs)

    def variant_trainer(self, **overrides) -> L.Trainer:
        """A fresh Trainer with this one's settings but no callbacks, logger or checkpointing."""
        arguments = dict(self._init_arguments)
        arguments.update(callbacks=[], logger=False, enable_checkpointing=False, enable_model_summary=False)
        arguments.update(overrides)
        return L.Trainer(**arguments)

    def _callback(self, kind):
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    # ------------------------------------------------------------------ demo
    def demo(self, model: PrunableCausalLM, datamodule: PruneDataModule, report_dir: str | None = None) -> list[dict]:
        """Dense vs pruned vs pruned + LoRA on one model, with the configured pruning callbacks.

        Args:
            model: The dense model (its ``export_dir`` receives the recovered checkpoint).
            datamodule: Capture, fine-tune and evaluation data.
            report_dir: Where the comparison JSON goes (default: ``trainer.default_root_dir``).

        Returns:
            The three evaluation results (dense, pruned, pruned + LoRA).

        Raises:
            ValueError: If the Trainer has no SelectivityPruneCallback.
        """
        if self._callback(SelectivityPruneCallback) is None:
            raise ValueError("`demo` needs a SelectivityPruneCallback in `trainer.callbacks`")
        phases: dict[str, float] = {}
        start = time.perf_counter()
        model.suite.settings.label = "dense"
        self.variant_trainer().test(model, datamodule=datamodule, verbose=False)
        dense = model.test_results
        phases["evaluate dense"] = time.perf_counter() - start

        start = time.perf_counter()
        model.suite.settings.label = None
        self.test(model, datamodule=datamodule, verbose=False)  # the callbacks capture and slice in setup
        pruned = dict(model.test_results, label=f"pruned {model.prune_plan.exact_ratio:.1%} ({model.prune_plan.mode})")
        phases["capture + prune + evaluate"] = time.perf_counter() - start

        start = time.perf_counter()
        self.fit(model, datamodule=datamodule)  # already pruned: LoRA recovery, merge, export
        phases["LoRA recovery + export"] = time.perf_counter() - start
        start = time.perf_counter()
        self.variant_trainer().test(model, datamodule=datamodule, verbose=False)
        recovered = dict(model.test_results, label=f"pruned + LoRA ({self.global_step} steps)")
        phases["evaluate recovered"] = time.perf_counter() - start

        results = [dense, pruned, recovered]
        if self.is_global_zero:
            text = print_comparison(results, title="lit_prune demo: dense vs pruned vs recovered")
            out = Path(report_dir or self.default_root_dir)
            write_json({"results": results, "phases_s": phases, "export": str(model.exported_to),
                        "table": text}, out / "demo.json")
            rank_zero_info(f"phases (s): {', '.join(f'{k} {v:.0f}' for k, v in phases.items())}; "
                           f"recovered model in {model.exported_to}; report {out / 'demo.json'}")
        return results

    # ------------------------------------------------------------------ sweep
    def sweep(
        self,
        model: PrunableCausalLM,
        datamodule: PruneDataModule,
        ratios: list[float] | None = None,
        modes: list[str] | None = None,
        random_seeds: list[int] | None = None,
        recover_modes: list[str] | None = None,
        aggregations: list[str] | None = None,
        recovery_steps: int = 40,
        report_dir: str | None = None,
    ) -> dict:
        """Capture once, then prune, evaluate and (for ``recover_modes``) recover every (ratio, criterion).

        Args:
            model: The dense model; every variant is a fresh copy of it.
            datamodule: Capture, fine-tune and evaluation data.
            ratios: Nominal pruning ratios (default 5%..35% in 5% steps, as in the paper).
            modes: Criteria (default ``selective``, ``random``, ``reverse``, ``target_mean``).
            random_seeds: Seeds of ``random`` (the paper: 42 and 33).
            recover_modes: Criteria whose pruned models get LoRA recovery (default ``selective``, ``random``).
            aggregations: Activation aggregations to compare for ``selective`` (``prompt`` is the paper's;
                ``token`` is ours): every extra one adds a ``selective/token`` row.
            recovery_steps: LoRA steps per recovered variant.
            report_dir: Folder of the report, ``sweep.json`` and figures (default: ``<trainer.default_root_dir>/sweep``,
                which always holds the statistics, reference outputs and per-variant evaluations).

        Returns:
            Everything the report shows (also written as ``sweep.json``).

        Raises:
            ValueError: For a bad ratio, criterion, aggregation or step count.
        """
        ratios = [validate_ratio(r) for r in (ratios or [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35])]
        modes = list(modes or ["selective", "random", "reverse", "target_mean"])
        random_seeds = list(random_seeds or [42, 33])
        recover_modes = list(recover_modes if recover_modes is not None else ["selective", "random"])
        aggregations = list(aggregations or ["prompt", "token"])
        for mode in modes + recover_modes:
            if mode not in CRITERIA:
                raise ValueError(f"`modes`/`recover_modes` entries must be in {CRITERIA}; got {mode!r}")
        for aggregation in aggregations:
            if aggregation not in AGGREGATIONS:
                raise ValueError(f"`aggregations` entries must be in {AGGREGATIONS}; got {aggregation!r}")
        if recovery_steps < 1:
            raise ValueError(f"`recovery_steps` must be >= 1; got {recovery_steps}")
        prune = self._callback(SelectivityPruneCallback)
        multiple_of = prune.multiple_of if prune else 128
        work = Path(self.default_root_dir) / "sweep"  # statistics, reference outputs, per-variant evaluations
        out = Path(report_dir) if report_dir else work  # report.md, sweep.json and the figures
        started = time.perf_counter()
        accepted = inspect.signature(PrunableCausalLM.__init__).parameters
        hparams = {k: v for k, v in model.hparams.items() if k in accepted}  # LightningCLI adds `_instantiator`

        def fresh(label: str) -> PrunableCausalLM:
            variant = PrunableCausalLM(**{**hparams, "export_dir": None})
            variant.suite.settings = dataclasses.replace(model.suite.settings, label=label, output_dir=str(work / "eval"),
                                                         reference_outputs=str(work / "reference_outputs.json"))
            return variant

        stats = self._sweep_statistics(model, datamodule, aggregations, work)
        for ratio in ratios:  # fail before any evaluation if a ratio cannot be sliced
            kept_width(stats["prompt"].width, ratio, multiple_of)

        runs: list[dict] = []
        dense_module = fresh("dense")
        self.variant_trainer().test(dense_module, datamodule=datamodule, verbose=False)
        dense = dense_module.test_results
        del dense_module
        variants = [(m, s, "prompt") for m in modes for s in (random_seeds if m == "random" else [42])]
        variants += [("selective", 42, a) for a in aggregations if a != "prompt"]
        total = len(ratios) * len(variants)
        for ratio in ratios:
            for mode, seed, aggregation in variants:
                name = mode + (f"/seed{seed}" if mode == "random" else "") + (
                    f"/{aggregation}" if aggregation != "prompt" else "")
                rank_zero_info(f"sweep [{len(runs) + 1}/{total}] {name} at {ratio:.0%}")
                variant = fresh(f"{name}@{ratio:.2f}")
                plan = make_plan(stats[aggregation], ratio, mode, multiple_of, seed,
                                 provenance={"model": model.model_name_or_path})
                plan.apply(variant.model)
                variant.set_prune_plan(plan)
                self.variant_trainer().test(variant, datamodule=datamodule, verbose=False)
                run = {"mode": name, "criterion": mode, "seed": seed, "aggregation": aggregation, "ratio": ratio,
                       "exact_ratio": plan.exact_ratio, "kept_width": plan.kept_width, "pruned": variant.test_results}
                if mode in recover_modes and aggregation == "prompt":
                    variant.suite.settings = dataclasses.replace(variant.suite.settings, label=f"{name}+lora@{ratio:.2f}")
                    self.variant_trainer(max_steps=recovery_steps, max_epochs=None, val_check_interval=None,
                                         limit_val_batches=0, enable_progress_bar=False).fit(variant, datamodule=datamodule)
                    variant.merged_model()
                    self.variant_trainer().test(variant, datamodule=datamodule, verbose=False)
                    run["recovered"] = variant.test_results
                runs.append(run)
                del variant
        summary = {"dense": dense, "runs": runs, "multiple_of": multiple_of, "width": stats["prompt"].width,
                   "num_layers": stats["prompt"].num_layers, "recovery_steps": recovery_steps,
                   "model": model.model_name_or_path, "wall_time_s": time.perf_counter() - started,
                   "layer_counts": _layer_counts(stats["prompt"])}
        if self.is_global_zero:
            from lit_prune.sweep_report import write_sweep_report

            write_json(summary, out / "sweep.json")
            report = write_sweep_report(summary, out)
            rank_zero_info(f"sweep finished in {summary['wall_time_s'] / 60:.1f} min; report {report}")
        return summary

    def _sweep_statistics(self, model, datamodule, aggregations, out: Path) -> dict[str, NeuronStats]:
        """Capture once per aggregation (or load the statistics a previous sweep saved)."""
        template = self._callback(ActivationCaptureCallback) or ActivationCaptureCallback()
        prompts = datamodule.capture_prompts(model.tokenizer)
        stats = {}
        for aggregation in dict.fromkeys(["prompt", *aggregations]):
            capture = ActivationCaptureCallback(
                target_prompts=prompts["target"], distractor_prompts=prompts["distractor"],
                batch_size=template.batch_size, max_length=template.max_length, aggregation=aggregation,
                stats_path=str(out / f"stats-{aggregation}.pt"), progress=template.progress)
            stats[aggregation] = capture.ensure_stats(self, model)
        return stats


def _layer_counts(stats: NeuronStats) -> dict:
    """Per layer: neurons more active on target prompts (S > 0) and on distractor prompts (S < 0), plus the
    strongly selective ones (|S| > 0.5), for the paper's Fig. 6."""
    from lit_prune.pruning.importance import selectivity

    scores = selectivity(stats)
    return {"target": (scores > 0).sum(1).tolist(), "distractor": (scores < 0).sum(1).tolist(),
            "target_strong": (scores > 0.5).sum(1).tolist(), "distractor_strong": (scores < -0.5).sum(1).tolist()}
