"""What the recipes share: finding a callback, fresh copies of the model, one capture per capture setting."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import lightning as L

from lit_prune.callbacks.capture import ActivationCaptureCallback
from lit_prune.module import PrunableCausalLM
from lit_prune.pruning.engine import PruneSpec
from lit_prune.pruning.stats import NeuronStats

__all__ = ["capture_statistics", "fresh_copy"]


def _callback(trainer: L.Trainer, kind):
    """The trainer's first callback of type ``kind`` (None if it has none)."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def fresh_copy(model: PrunableCausalLM, label: str, work: Path) -> PrunableCausalLM:
    """A fresh copy of ``model`` (same hyper-parameters, no export) that writes its evaluation under ``work``, as
    ``label``. Inside :func:`lit_prune.loading.preloaded` it copies the weights in memory instead of reading them."""
    accepted = inspect.signature(PrunableCausalLM.__init__).parameters
    hparams = {k: v for k, v in model.hparams.items() if k in accepted}  # LightningCLI adds `_instantiator`
    variant = PrunableCausalLM(**{**hparams, "export_dir": None})
    variant.evaluator.settings = dataclasses.replace(
        model.evaluator.settings, label=label, output_dir=str(work),
        reference_outputs=model.evaluator.settings.reference_outputs or str(Path(work).parent / "reference_outputs.json"))
    return variant


def capture_statistics(trainer: L.Trainer, model, datamodule, specs: list[PruneSpec], out: Path) -> dict[str, NeuronStats]:
    """Capture once per capture setting the specs use, with every statistic they need (or load the files a
    previous run saved)."""
    template = _callback(trainer, ActivationCaptureCallback) or ActivationCaptureCallback()
    texts = datamodule.capture_texts(model.tokenizer)
    stats = {}
    for capture in dict.fromkeys(s.capture for s in specs):
        group = [s for s in specs if s.capture == capture]
        needs = set().union(*(s.needs() for s in group))
        callback = ActivationCaptureCallback(
            target_prompts=[p for p, _ in texts["target"]], distractor_prompts=[p for p, _ in texts["distractor"]],
            target_responses=_responses(texts["target"]), distractor_responses=_responses(texts["distractor"]),
            batch_size=template.batch_size, max_length=template.max_length, capture=capture,
            gram="gram" in needs, gradients="gradients" in needs, gram_device=template.gram_device,
            stats_path=str(out / f"stats-{capture}.pt"), progress=template.progress, tokenizer=template.tokenizer)
        stats[capture] = callback.ensure_stats(trainer, model, specs=group)
    return stats


def _responses(texts: list[tuple[str, str | None]]) -> list[str] | None:
    """The responses of ``(prompt, response)`` pairs, or None when none has one ("" marks a missing one)."""
    return [r or "" for _, r in texts] if any(r for _, r in texts) else None
