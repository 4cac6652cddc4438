"""ActivationCaptureCallback: stream SwiGLU activation statistics of target and distractor prompts.

Runs in ``setup``, before the optimizer exists and before LoRA wraps the model, in eval mode without
gradients. Under DDP every rank captures its shard of the prompts and the statistics are summed with
the strategy's reduce, so every rank holds the same statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typing_extensions import override

from lit_prune.callbacks._utils import applied_plan, find_causal_lm, find_tokenizer, resume_plan
from lit_prune.pruning.stats import (
    AGGREGATIONS,
    GROUPS,
    ActivationRecorder,
    NeuronStats,
    model_fingerprint,
    prompt_set_hash,
)

__all__ = ["ActivationCaptureCallback"]

log = logging.getLogger(__name__)


class ActivationCaptureCallback(Callback):
    """Capture per-neuron ``|h|`` statistics of every SwiGLU MLP on target and distractor prompts.

    Prompts come from the arguments or, when those are None, from the datamodule's
    ``capture_prompts(tokenizer) -> {"target": [...], "distractor": [...]}``.
    """

    def __init__(
        self,
        target_prompts: Sequence[str] | None = None,
        distractor_prompts: Sequence[str] | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        aggregation: str = "prompt",
        stats_path: str | None = None,
        progress: bool = True,
        tokenizer=None,
    ) -> None:
        """
        Args:
            target_prompts: Formatted target-task prompts (default: from the datamodule).
            distractor_prompts: Formatted distractor prompts (default: from the datamodule).
            batch_size: Prompts per forward pass.
            max_length: Prompts are cut to this many tokens.
            aggregation: ``"prompt"`` (the paper: masked mean per prompt) or ``"token"`` (every valid token).
            stats_path: If the file exists and was captured on the same weights (model fingerprint), prompts
                and aggregation, load statistics from it instead of capturing; otherwise capture (with a
                warning naming what differs) and save the statistics there, so a ratio sweep captures once.
            progress: Show a progress bar on rank 0.
            tokenizer: Tokenizer to use (default: ``pl_module.tokenizer``).

        Raises:
            ValueError: For an empty prompt list, ``batch_size`` or ``max_length`` < 1, or an unknown
                ``aggregation``.
        """
        super().__init__()
        for name, prompts in (("target_prompts", target_prompts), ("distractor_prompts", distractor_prompts)):
            if prompts is not None and len(prompts) == 0:
                raise ValueError(f"`{name}` is empty; give at least one prompt or None to use the datamodule")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"`batch_size` and `max_length` must be >= 1; got {batch_size}, {max_length}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}; got {aggregation!r}")
        self.prompts = {"target": target_prompts, "distractor": distractor_prompts}
        self.batch_size = batch_size
        self.max_length = max_length
        self.aggregation = aggregation
        self.stats_path = stats_path
        self.progress = progress
        self.tokenizer = tokenizer
        self.stats: NeuronStats | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.ensure_stats(trainer, pl_module)

    def ensure_stats(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NeuronStats | None:
        """Statistics for this run: cached, loaded from ``stats_path`` or captured now.

        Returns None (and captures nothing) when the model is already pruned or the run resumes from a
        checkpoint that holds a plan.
        """
        if self.stats is not None:
            return self.stats
        if applied_plan(pl_module) is not None or resume_plan(trainer) is not None:
            return None
        model = find_causal_lm(pl_module)
        if self.stats_path and Path(self.stats_path).is_file():
            stats = NeuronStats.load(self.stats_path)
            stats.check_compatible(model)
            # Rank 0 decides, so that every rank either loads or captures.
            stale = trainer.strategy.broadcast(self._stale_reason(stats, trainer, pl_module) if trainer.is_global_zero
                                               else None)
            if stale is None:
                rank_zero_info(f"loaded activation statistics from {self.stats_path}; not capturing again")
                self.stats = stats
                return stats
            rank_zero_warn(f"not using the statistics in {self.stats_path}: {stale}; capturing again and "
                           "overwriting the file")
        self.stats = self.capture(trainer, pl_module)
        if self.stats_path and trainer.is_global_zero:
            self.stats.save(self.stats_path)
        return self.stats

    def _stale_reason(self, stats: NeuronStats, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """Why cached ``stats`` do not belong to this run (other weights, prompts or aggregation), or None."""
        if stats.aggregation != self.aggregation:
            return f"they were aggregated per {stats.aggregation}, this callback aggregates per {self.aggregation}"
        stored = stats.metadata.get("model_fingerprint")
        if stored is None:
            return "they carry no model fingerprint (saved by an older lit_prune)"
        if stored != model_fingerprint(find_causal_lm(pl_module)):
            return (f"they were captured on other weights of {stats.metadata.get('model', 'the model')!r} "
                    "(model fingerprint differs)")
        prompts = self._prompts(trainer, find_tokenizer(pl_module, self.tokenizer))
        for group in GROUPS:
            if stats.metadata.get(f"{group}_hash") != prompt_set_hash(prompts[group]):
                return f"they were captured on another {group} prompt set"
        return None

    def _prompts(self, trainer: L.Trainer, tokenizer) -> dict[str, list[str]]:
        prompts = dict(self.prompts)
        if any(p is None for p in prompts.values()):
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "capture_prompts"):
                raise ValueError("ActivationCaptureCallback needs `target_prompts` and `distractor_prompts`, or a "
                                 "datamodule with `capture_prompts(tokenizer)`")
            from_data = datamodule.capture_prompts(tokenizer)
            prompts = {g: list(p) if p is not None else list(from_data[g]) for g, p in prompts.items()}
        for group in GROUPS:
            if not prompts[group]:
                raise ValueError(f"the {group} capture set is empty")
        return {g: list(p) for g, p in prompts.items()}

    @torch.no_grad()
    def capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NeuronStats:
        """Run this rank's shard of the prompts through the model and sum the statistics over ranks."""
        model = find_causal_lm(pl_module)
        tokenizer = find_tokenizer(pl_module, self.tokenizer)
        prompts = self._prompts(trainer, tokenizer)
        fingerprint = model_fingerprint(model)  # of the weights as loaded (before any move to the device)
        device = trainer.strategy.root_device
        was_training = model.training
        pl_module.to(device)
        model.eval()
        recorder = ActivationRecorder(model, aggregation=self.aggregation)
        rank, world = trainer.global_rank, trainer.world_size
        shards = {g: self._batches(tokenizer, p[rank::world]) for g, p in prompts.items()}
        total = sum(len(b) for b in shards.values())
        show = self.progress and trainer.is_global_zero
        try:
            with recorder.recording(), Progress(
                TextColumn("[bold]capture[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), disable=not show, transient=False,
            ) as bar:
                task = bar.add_task("target/distractor batches", total=total)
                for group, batches in shards.items():
                    for input_ids, attention_mask in batches:
                        recorder.observe(model, input_ids.to(device), attention_mask.to(device), group)
                        bar.advance(task)
        finally:
            model.train(was_training)
        stats = recorder.stats
        for tensor in stats.tensors():
            tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))
        stats = recorder.finalize().to("cpu")
        stats.metadata.update(
            model=getattr(model.config, "_name_or_path", type(model).__name__), model_fingerprint=fingerprint,
            target_prompts=len(prompts["target"]), distractor_prompts=len(prompts["distractor"]),
            target_hash=prompt_set_hash(prompts["target"]), distractor_hash=prompt_set_hash(prompts["distractor"]),
            max_length=self.max_length, world_size=world,
        )
        rank_zero_info(f"captured {len(prompts['target'])} target and {len(prompts['distractor'])} distractor prompts "
                       f"over {world} rank(s): {stats.num_layers} layers x {stats.width} neurons")
        return stats

    def _batches(self, tokenizer, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tokenize, sort by length (less padding) and right-pad into batches."""
        if not prompts:
            return []
        ids = tokenizer(prompts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            rows = [ids[i] for i in order[start:start + self.batch_size]]
            width = max(1, max(len(r) for r in rows))
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            batches.append((input_ids, mask))
        return batches
