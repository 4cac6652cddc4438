"""ActivationCaptureCallback: stream the SwiGLU statistics every width criterion needs, in one pass.

Runs in ``setup``, before the optimizer exists and before LoRA wraps the model, in eval mode. It first checks
the Trainer's prune callbacks against the model (their ``multiple_of``, ratio and criterion), so a bad setting
fails before any forward pass; then it records exactly the statistics those criteria need (the target Gram
matrix, gradient statistics from a backward pass) on the tokens they ask for (``prompt``: the paper;
``response``: prompt + reference response, teacher-forced). Under DDP every rank captures its shard of the
texts and the statistics are summed with the strategy's reduce, so every rank holds the same statistics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typing_extensions import override

from lit_prune.callbacks._utils import (
    check_sizes,
    Text,
    applied_plan,
    check_not_pruned_elsewhere,
    datamodule_texts,
    find_causal_lm,
    find_tokenizer,
    prune_callbacks,
    resume_plan,
    text_pairs,
)
from lit_prune.data.batching import labelled_batches
from lit_prune.pruning.engine import CAPTURE_TOKENS
from lit_prune.pruning.stats import (
    GROUPS,
    ActivationRecorder,
    NeuronStats,
    StatsFileError,
    model_fingerprint,
    prompt_set_hash,
)

__all__ = ["ActivationCaptureCallback", "check_output_path"]

log = logging.getLogger(__name__)

def check_output_path(name: str, value: str | None, directory_ok: bool = False) -> None:
    """Raise now, not after the capture, if ``value`` cannot be written as a file.

    Raises:
        ValueError: If it is a directory (unless ``directory_ok``) or its nearest existing parent is not a
            writable directory; the message names the argument and the value.
    """
    if value is None:
        return
    path = Path(value)
    if path.is_dir() and not directory_ok:
        raise ValueError(f"`{name}`={value!r} is a directory; give a file path")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"`{name}`={value!r} cannot be written: {str(parent)!r} is not a writable directory")


class ActivationCaptureCallback(Callback):
    """Capture per-neuron statistics of every SwiGLU MLP on target and distractor texts.

    Texts come from the arguments or, when those are None, from the datamodule's ``capture_texts(tokenizer)``
    (``{"target": [(prompt, response), ...], ...}``) or ``capture_prompts(tokenizer)``.
    """

    def __init__(
        self,
        target_prompts: Sequence[str] | None = None,
        distractor_prompts: Sequence[str] | None = None,
        target_responses: Sequence[str] | None = None,
        distractor_responses: Sequence[str] | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        capture: str | None = None,
        gram: bool | None = None,
        gradients: bool | None = None,
        gram_device: str | None = None,
        stats_path: str | None = None,
        progress: bool = True,
        tokenizer=None,
        aggregation: str | None = None,
    ) -> None:
        """
        Args:
            target_prompts: Formatted target-task prompts (default: from the datamodule).
            distractor_prompts: Formatted distractor prompts (default: from the datamodule).
            target_responses: Reference responses of ``target_prompts`` (same length), for ``capture="response"``.
            distractor_responses: Reference responses of ``distractor_prompts``.
            batch_size: Texts per forward pass.
            max_length: Texts (prompt + response) are cut to this many tokens; how many were cut is reported once
                per group.
            capture: ``prompt`` (the paper) or ``response`` (prompt + reference response, where there is one).
                None: what the Trainer's prune callbacks ask for (``prompt`` without one).
            gram: Record the target Gram matrix ``sum h h^T`` of every layer (``compensated`` and ``refit`` need
                it; costs ``layers x d_ff^2`` float64). None: when a prune callback needs it.
            gradients: Record gradient statistics from a backward pass on the target texts (``taylor`` needs
                them). None: when a prune callback needs them.
            gram_device: Where the Gram accumulator lives (default: the model's device); ``cpu`` keeps its
                ``layers x d_ff^2`` float64 (18 GB at Qwen2.5-1.5B) in host memory.
            stats_path: If the file exists and was captured on the same weights (model fingerprint), texts and
                settings, load statistics from it instead of capturing; otherwise capture (with a warning naming
                what differs) and save the statistics there, so a ratio sweep captures once.
            progress: Show a progress bar on rank 0.
            tokenizer: Tokenizer to use (default: ``pl_module.tokenizer``).
            aggregation: Deprecated and ignored: every capture now holds both per-prompt and per-token
                statistics; the prune callback's ``aggregation`` chooses.

        Raises:
            ValueError: For a string or empty text list, responses of another length, ``batch_size`` or
                ``max_length`` < 1, an unknown ``capture``, or a ``stats_path`` that cannot be written.
        """
        super().__init__()
        texts = {"target": text_pairs("target", target_prompts, target_responses),
                 "distractor": text_pairs("distractor", distractor_prompts, distractor_responses)}
        check_sizes(batch_size=batch_size, max_length=max_length)
        if capture is not None and capture not in CAPTURE_TOKENS:
            raise ValueError(f"`capture` must be one of {CAPTURE_TOKENS} or None; got {capture!r}")
        if aggregation is not None:
            if aggregation not in ("prompt", "token"):
                raise ValueError(f"`aggregation` must be one of ('prompt', 'token'); got {aggregation!r}")
            rank_zero_warn("`ActivationCaptureCallback(aggregation=...)` is deprecated and ignored: every capture "
                           "holds per-prompt and per-token statistics; set `aggregation` on the prune callback")
        check_output_path("stats_path", stats_path)
        self.texts = texts
        self.batch_size = batch_size
        self.max_length = max_length
        self.capture_tokens = capture
        self.gram = gram
        self.gradients = gradients
        self.gram_device = gram_device
        self.stats_path = stats_path
        self.progress = progress
        self.tokenizer = tokenizer
        self.stats: NeuronStats | None = None
        self.truncated: dict[str, int] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("validate", "predict"):
            return  # only fit (and test, for an evaluate-after-pruning run) prune
        self.ensure_stats(trainer, pl_module)

    # ------------------------------------------------------------------ what to capture
    def settings(self, trainer: L.Trainer, model: torch.nn.Module, specs: list | None = None) -> dict:
        """Capture tokens and optional statistics for this run, after checking the prune specs on ``model``.

        Args:
            trainer: The Trainer (its prune callbacks' specs are used unless ``specs`` is given).
            model: The causal LM.
            specs: The :class:`~lit_prune.pruning.engine.PruneSpec` s to capture for (the sweep passes its own).

        Raises:
            ValueError: If a prune callback does not fit the model, two callbacks ask for different tokens, or
                an explicit ``gram=False`` / ``gradients=False`` / ``capture`` contradicts a criterion.
        """
        specs = [c.spec for c in prune_callbacks(trainer)] if specs is None else list(specs)
        for spec in specs:
            spec.check_model(model)  # multiple_of vs d_ff, ratio rounding: before any forward pass
        wanted = {s.capture for s in specs}
        if len(wanted) > 1:
            raise ValueError(f"the prune callbacks ask for different capture tokens {sorted(wanted)}; use one")
        capture = self.capture_tokens or (wanted.pop() if wanted else "prompt")
        if specs and capture != specs[0].capture:
            raise ValueError(f"ActivationCaptureCallback(capture={capture!r}) but the prune callback's `capture` is "
                             f"{specs[0].capture!r}; set one of them to match (or leave the capture's unset)")
        needs = set().union(*(s.needs() for s in specs)) if specs else set()
        options = {}
        for option in ("gram", "gradients"):
            value = getattr(self, option)
            if value is False and option in needs:
                users = [s.label for s in specs if option in s.needs()]
                raise ValueError(f"ActivationCaptureCallback({option}=False) but {users} need the {option} "
                                 f"statistics: set `{option}=True` or leave it unset (None)")
            options[option] = bool(value) if value is not None else option in needs
        return {"capture": capture, **options}

    # ------------------------------------------------------------------ load or capture
    def ensure_stats(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     specs: list | None = None) -> NeuronStats | None:
        """Statistics for this run: cached, loaded from ``stats_path`` or captured now (for ``specs``, default the
        Trainer's prune callbacks').

        Returns None (and captures nothing) when the model is already pruned by this Trainer's prune callback
        or the run resumes from a checkpoint that holds a plan.

        Raises:
            ValueError: If the model arrived already pruned while a prune callback is present, or a setting does
                not fit the model (see :meth:`settings`), before any forward pass.
        """
        check_not_pruned_elsewhere(trainer, pl_module)
        if applied_plan(pl_module) is not None or resume_plan(trainer) is not None:
            return None
        model = find_causal_lm(pl_module)
        settings = self.settings(trainer, model, specs)
        if self.stats is not None and self._missing(self.stats, settings) is None:
            return self.stats
        if self.stats_path and Path(self.stats_path).is_file():
            # Rank 0 decides, so that every rank either loads or captures.
            stale, stats = None, None
            if trainer.is_global_zero:
                try:
                    stats = NeuronStats.load(self.stats_path)
                    stale = self._stale_reason(stats, trainer, pl_module, settings)
                except StatsFileError as error:
                    stale = str(error)
            stale = trainer.strategy.broadcast(stale)
            if stale is None:
                if stats is None:
                    stats = NeuronStats.load(self.stats_path)
                rank_zero_info(f"loaded activation statistics from {self.stats_path}; not capturing again")
                self.stats = stats
                return stats
            rank_zero_warn(f"not using the statistics in {self.stats_path}: {stale}; capturing again and "
                           "overwriting the file")
        self.stats = self.capture(trainer, pl_module, **settings)
        if self.stats_path and trainer.is_global_zero:
            self.stats.save(self.stats_path)
        return self.stats

    @staticmethod
    def _missing(stats: NeuronStats, settings: dict) -> str | None:
        if stats.metadata.get("capture") != settings["capture"]:
            return f"they were captured on {stats.metadata.get('capture')} tokens, this run asks for {settings['capture']}"
        for option in ("gram", "gradients"):
            if settings[option] and option not in stats.statistics:
                return f"they hold no {option} statistics, which this run needs"
        return None

    def _stale_reason(self, stats: NeuronStats, trainer: L.Trainer, pl_module: L.LightningModule,
                      settings: dict) -> str | None:
        """Why cached ``stats`` do not belong to this run (other weights, texts or settings), or None."""
        model = find_causal_lm(pl_module)
        try:
            stats.check_compatible(model)
        except ValueError as error:
            return str(error)
        stored = stats.metadata.get("model_fingerprint")
        if stored is None:
            return "they carry no model fingerprint"
        if stored != model_fingerprint(model):
            return (f"they were captured on other weights of {stats.metadata.get('model', 'the model')!r} "
                    "(model fingerprint differs)")
        missing = self._missing(stats, settings)
        if missing:
            return missing
        if stats.metadata.get("max_length") != self.max_length:
            return f"they were captured with max_length {stats.metadata.get('max_length')}, not {self.max_length}"
        texts = self._texts(trainer, find_tokenizer(pl_module, self.tokenizer))
        for group in GROUPS:
            if stats.metadata.get(f"{group}_hash") != _texts_hash(texts[group], settings["capture"]):
                return f"they were captured on another {group} text set"
        return None

    def _texts(self, trainer: L.Trainer, tokenizer) -> dict[str, list[Text]]:
        texts = dict(self.texts)
        if any(t is None for t in texts.values()):
            from_data = datamodule_texts(trainer, tokenizer)
            if from_data is None:
                raise ValueError("ActivationCaptureCallback needs `target_prompts` and `distractor_prompts`, or a "
                                 "datamodule with `capture_texts(tokenizer)` or `capture_prompts(tokenizer)`")
            texts = {g: t if t is not None else list(from_data[g]) for g, t in texts.items()}
        for group in GROUPS:
            if not texts[group]:
                raise ValueError(f"the {group} capture set is empty")
            empty = sum(1 for prompt, _ in texts[group] if not prompt.strip())
            if empty == len(texts[group]):
                raise ValueError(f"every one of the {empty} {group} capture prompts is empty")
        return texts

    @torch.no_grad()
    def capture(self, trainer: L.Trainer, pl_module: L.LightningModule, capture: str = "prompt", gram: bool = False,
                gradients: bool = False) -> NeuronStats:
        """Run this rank's shard of the texts through the model and sum the statistics over ranks."""
        started = time.perf_counter()
        model = find_causal_lm(pl_module)
        tokenizer = find_tokenizer(pl_module, self.tokenizer)
        texts = self._texts(trainer, tokenizer)
        fingerprint = model_fingerprint(model)  # of the weights as loaded (before any move to the device)
        device = trainer.strategy.root_device
        was_training = model.training
        pl_module.to(device)
        model.eval()
        recorder = ActivationRecorder(model, gram=gram, gradients=gradients, gram_device=self.gram_device)
        rank, world = trainer.global_rank, trainer.world_size
        if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            rank, world = 0, 1  # no process group yet (e.g. the sweep before any fit): capture everything here
        self.truncated = {}
        shards = {g: self._batches(tokenizer, t[rank::world], capture, g) for g, t in texts.items()}
        total = sum(len(b) for b in shards.values()) + (len(shards["target"]) if gradients else 0)
        show = self.progress and trainer.is_global_zero
        try:
            with recorder.recording(), Progress(
                TextColumn("[bold]capture[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), disable=not show, transient=False,
            ) as bar:
                task = bar.add_task("target/distractor batches" + (" + gradients" if gradients else ""), total=total)
                for group, batches in shards.items():
                    for input_ids, attention_mask, _ in batches:
                        recorder.observe(model, input_ids.to(device), attention_mask.to(device), group)
                        bar.advance(task)
                if gradients:
                    for input_ids, attention_mask, labels in shards["target"]:
                        recorder.observe_gradients(model, input_ids.to(device), attention_mask.to(device),
                                                   labels.to(device))
                        bar.advance(task)
        finally:
            model.train(was_training)
        stats = recorder.stats
        for tensor in stats.tensors():
            if tensor.device == torch.device(device) or trainer.world_size == 1:
                tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))
            else:  # a host-memory Gram: reduce one layer at a time through the device
                for part in tensor:
                    part.copy_(trainer.strategy.reduce(part.to(device), reduce_op="sum").to(part.device))
        truncated = {g: int(trainer.strategy.reduce(torch.tensor(float(self.truncated.get(g, 0)), device=device),
                                                    reduce_op="sum")) for g in GROUPS}
        self.truncated = truncated
        stats = recorder.finalize().to("cpu")
        responses = {g: sum(1 for _, r in texts[g] if r) if capture == "response" else 0 for g in GROUPS}
        stats.metadata.update(
            model=getattr(model.config, "_name_or_path", type(model).__name__), model_fingerprint=fingerprint,
            target_prompts=len(texts["target"]), distractor_prompts=len(texts["distractor"]),
            target_hash=_texts_hash(texts["target"], capture), distractor_hash=_texts_hash(texts["distractor"], capture),
            capture=capture, target_responses=responses["target"], distractor_responses=responses["distractor"],
            max_length=self.max_length, truncated=truncated, world_size=world,
            capture_seconds=time.perf_counter() - started,
        )
        for group, count in truncated.items():
            if count:
                rank_zero_warn(f"capture: {count} of {len(texts[group])} {group} texts were longer than max_length="
                               f"{self.max_length} tokens and were cut")
        rank_zero_info(f"captured {len(texts['target'])} target and {len(texts['distractor'])} distractor texts "
                       f"({capture} tokens{', Gram' if gram else ''}{', gradients' if gradients else ''}) over "
                       f"{world} rank(s): {stats.num_layers} layers x {stats.width} neurons")
        return stats

    def _batches(self, tokenizer, texts: list[Text], capture: str,
                 group: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:func:`~lit_prune.data.batching.labelled_batches` with this callback's sizes; cut texts are counted per
        group in ``truncated``."""
        batches, cut = labelled_batches(tokenizer, texts, capture, self.max_length, self.batch_size)
        if cut:
            self.truncated[group] = self.truncated.get(group, 0) + cut
        return batches


def _texts_hash(texts: list[Text], capture: str) -> str:
    """Hash of what the capture reads: prompts, and the responses when capturing on them."""
    if capture == "response":
        return prompt_set_hash(f"{p}\x01{r or ''}" for p, r in texts)
    return prompt_set_hash(p for p, _ in texts)
