"""WeightSparsityCallback: zero weights of the decoder's linear layers (magnitude, Wanda, SparseGPT, RIA; unstructured
or N:M) inside ``trainer.fit``, and hold the zeros through LoRA recovery into the export.

When. In ``setup``: after :class:`SelectivityPruneCallback` has sliced the MLPs (when there is one; this callback
must come after it in ``trainer.callbacks``), before ``configure_model`` wraps the model with LoRA and before the
optimizer exists. Every argument is checked when the callback is built, the model-dependent ones (target names, M
dividing the input width) in ``setup`` before any forward pass. The method itself is
:func:`lit_prune.pruning.sparsity.prune_model`; this callback only feeds it the calibration texts (the datamodule's
``capture_texts(tokenizer)`` groups, the same target/distractor sets width pruning captures on, or explicit texts),
shards them over the ranks and sums the statistics with ``trainer.strategy.reduce`` before each decision.

Holding the masks through recovery. LoRA's base weights are frozen, so the zeros stay in the base during training;
the adapters' update ``B A`` is dense. At the end of ``fit`` this callback re-masks the base *after merging*: its
``on_fit_end`` runs before the module's (Lightning's ``Trainer._run`` calls the callbacks' ``on_fit_end``, then the
LightningModule's, which for :class:`~lit_prune.module.PrunableCausalLM` merges and exports), so it merges first
with the module's own, idempotent ``merged_model()`` (the export then finds nothing left to merge), zeroes the
masked weights of the merged model and measures them. Why re-mask rather than mask the delta before merging: the
zeros are then exact by construction whatever peft does inside a merge (plain LoRA adds ``get_delta_weight``, DoRA
and the other variants merge by their own code; bf16 merges round), and a low-rank ``B A`` cannot itself carry the
mask, so masking the delta would mean patching peft's internals. With ``merge_on_export=False`` (an adapter-only
export) nothing is merged and a warning says the zeros hold in the base only. When the base itself trains (no LoRA),
the masks are re-applied after every training batch, so the optimizer never revives a pruned weight.

The model leaving ``fit`` (and its export, a dense Hugging Face checkpoint that plain ``from_pretrained`` loads)
holds exactly the masked zeros; the module's ``weight_sparsity`` (read into the export's ``lit_prune.json`` as
``"sparsity"``) describes the method, pattern and the sparsity per layer measured on those final weights.

Resume. The masks travel in checkpoints under ``checkpoint["lit_prune"]["sparsity"]`` (spec, provenance, masks
packed 8 per byte; beside the width plan's ``["plan"]``, which this callback never touches): this callback is their
one writer and :meth:`SparsityResult.from_checkpoint` their one reader. With ``trainer.ckpt_path`` set before
``fit`` (``python -m lit_prune fit --ckpt_path``), ``setup`` re-applies the stored masks without calibrating and the
checkpoint's weights (SparseGPT's updated ones) load next. A run resumed by ``trainer.fit(ckpt_path=...)``, which
``setup`` cannot see, calibrates and then adopts the checkpoint's masks when it loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks._utils import (
    rank_sum,
    check_sizes,
    Text,
    datamodule_texts,
    find_causal_lm,
    find_tokenizer,
    prune_callbacks,
    resume_checkpoint,
    text_pairs,
)
from lit_prune.data.batching import labelled_batches
from lit_prune.pruning.engine import CAPTURE_TOKENS
from lit_prune.pruning.plan import CHECKPOINT_KEY
from lit_prune.pruning.sparsity import SparsityResult, SparsitySpec, prune_model
from lit_prune.pruning.stats import prompt_set_hash

__all__ = ["CALIBRATION_GROUPS", "SPARSITY_KEY", "WeightSparsityCallback", "calibration_batches"]

log = logging.getLogger(__name__)

CALIBRATION_GROUPS = ("target", "distractor", "both")
# Sub-key of checkpoint[CHECKPOINT_KEY] (the width plan lives under "plan").
SPARSITY_KEY = "sparsity"



def calibration_batches(tokenizer, texts: Sequence[Text], capture: str = "response", max_length: int = 512,
                        batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches of :func:`~lit_prune.data.batching.labelled_batches` (texts with
    neither a prompt nor a response are dropped)."""
    texts = [(p, r) for p, r in texts if p or (capture == "response" and r)]
    return [(ids, mask) for ids, mask, _ in labelled_batches(tokenizer, texts, capture, max_length, batch_size)[0]]


class WeightSparsityCallback(Callback):
    """Zero a fraction (or N of every M) of the weights of the decoder's linear layers, before LoRA recovery."""

    def __init__(
        self,
        method: str = "wanda",
        pattern: str = "unstructured",
        sparsity: float | None = None,
        targets: Sequence[str] | None = None,
        calibration: str = "target",
        target_prompts: Sequence[str] | None = None,
        distractor_prompts: Sequence[str] | None = None,
        target_responses: Sequence[str] | None = None,
        distractor_responses: Sequence[str] | None = None,
        capture: str = "response",
        batch_size: int = 8,
        max_length: int = 512,
        alpha: float = 0.5,
        damping: float = 0.01,
        block_size: int = 128,
        sequential: bool | None = None,
        tokenizer=None,
    ) -> None:
        """
        Args:
            method: ``magnitude``, ``wanda``, ``sparsegpt`` or ``ria`` (see :mod:`lit_prune.pruning.sparsity`).
            pattern: ``unstructured`` or ``N:M`` (``2:4``, ``4:8``: N of every M consecutive input weights of each
                row removed).
            sparsity: Fraction of each targeted layer's weights to remove, in [0, 1), for ``unstructured``
                (default 0.5); exact to one weight per layer. Leave unset for N:M (it is N/M).
            targets: ``nn.Linear`` names inside the decoder layers (``q_proj``, ``mlp.down_proj``, ...). None:
                every linear of every decoder layer (q, k, v, o, gate, up, down); never the embeddings or LM head.
            calibration: Which capture group calibrates: ``target``, ``distractor`` or ``both``.
            target_prompts: Formatted target prompts (default: the datamodule's ``capture_texts(tokenizer)``).
            distractor_prompts: Formatted distractor prompts (default: from the datamodule).
            target_responses: Reference responses of ``target_prompts`` (same length), for ``capture="response"``.
            distractor_responses: Reference responses of ``distractor_prompts``.
            capture: ``response`` (prompt + reference response + EOS, where there is one) or ``prompt``.
            batch_size: Texts per calibration forward pass.
            max_length: Texts are cut to this many tokens.
            alpha: RIA's exponent of the input norm (0.5).
            damping: SparseGPT's damping, relative to the mean diagonal of ``H`` (0.01).
            block_size: SparseGPT's column block (128; a multiple of M for N:M).
            sequential: Calibrate layer by layer on the outputs of the pruned earlier layers (None: True for
                ``sparsegpt``, False for ``wanda``/``ria``).
            tokenizer: Tokenizer to use (default: ``pl_module.tokenizer``).

        Raises:
            ValueError: For an unknown ``method``, ``calibration`` or ``capture``; a ``pattern`` other than
                ``unstructured`` / ``N:M`` with ``0 < N < M``; ``sparsity`` outside [0, 1) or contradicting N:M;
                ``targets`` that are not a non-empty list of distinct names; ``alpha`` < 0; ``damping`` outside (0, 1);
                ``block_size`` < 1 or not a multiple of M; ``batch_size`` or ``max_length`` < 1; a text argument that
                is a string or empty; responses of another length than their prompts. Target names unknown to the
                model, and an M that does not divide a targeted layer's input width, fail in ``setup`` before any
                forward pass (they need the model).
        """
        super().__init__()
        self.spec = SparsitySpec(method, pattern, sparsity, targets, alpha, damping, block_size, sequential)
        if calibration not in CALIBRATION_GROUPS:
            raise ValueError(f"`calibration` must be one of {CALIBRATION_GROUPS}; got {calibration!r}")
        if capture not in CAPTURE_TOKENS:
            raise ValueError(f"`capture` must be one of {CAPTURE_TOKENS}; got {capture!r}")
        check_sizes(batch_size=batch_size, max_length=max_length)
        texts = {"target": text_pairs("target", target_prompts, target_responses),
                 "distractor": text_pairs("distractor", distractor_prompts, distractor_responses)}
        self.calibration = calibration
        self.texts = texts
        self.capture = capture
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.result: SparsityResult | None = None
        self._applied_to: torch.nn.Module | None = None
        self._packed: dict | None = None
        self._hold_every_step = False

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("validate", "predict"):
            return
        self.sparsify(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold_every_step = self._base_trains(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._hold_every_step:
            self.result.apply(find_causal_lm(pl_module))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The one writer; a top-level key, so a resumed run reads it in `setup`, before calibrating.
        if self.result is not None:
            if self._packed is None:
                self._packed = self.result.to_checkpoint()
            checkpoint.setdefault(CHECKPOINT_KEY, {})[SPARSITY_KEY] = self._packed

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.adopt_checkpoint(pl_module, checkpoint)

    # ------------------------------------------------------------------ the work
    def sparsify(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SparsityResult:
        """Compute and apply the masks once: re-apply the resume checkpoint's, or calibrate now.

        Raises:
            ValueError: If a SelectivityPruneCallback comes after this one, a target name or the pattern does not fit
                the model, the checkpoint's masks were made with other settings, or there are no calibration texts;
                all before any forward pass.
        """
        model = find_causal_lm(pl_module)
        if self.result is not None and self._applied_to is model and self.result.is_held(model):
            return self.result
        self._check_order(trainer)
        self.spec.check_model(model)  # target names, N:M widths: before any forward pass
        if self.spec.sparsity > 0 and hasattr(pl_module, "record_modification"):
            pl_module.record_modification(self.spec.label)  # the evaluation's reference: the weights before masking
        saved = self._checkpoint_masks(trainer)
        if saved is not None:
            self._check_same_spec(saved.spec)
            saved.apply(model)  # the checkpoint's weights load next
            rank_zero_info(f"resuming: re-applying the checkpoint's weight sparsity masks ({saved.spec.label}, "
                           f"{len(saved.masks)} linears) without calibrating")
            result = saved
        else:
            batches, provenance = [], {}
            if self.spec.needs_inputs:
                batches, provenance = self._calibration(trainer, pl_module)
                pl_module.to(trainer.strategy.root_device)
            reduce = rank_sum(trainer)
            result = prune_model(model, batches, self.spec, reduce=reduce, provenance=provenance)
        self.result, self._applied_to, self._packed = result, model, None
        measured = result.description(model)["measured"]
        rank_zero_info(f"weight sparsity {self.spec.label} on {len(result.masks)} linears: {measured['overall']:.2%} "
                       f"of their weights are zero")
        return result

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        """Merge LoRA (when the module's export would), re-mask, measure; return the description it records as
        ``pl_module.weight_sparsity``."""
        if self.result is None:
            return None
        model = find_causal_lm(pl_module)
        if hasattr(model, "peft_config"):
            if hasattr(pl_module, "merged_model") and pl_module.hparams.get("merge_on_export", True):
                model = pl_module.merged_model()  # what the module's export does next; it then has nothing to merge
            else:
                rank_zero_warn("WeightSparsityCallback: the LoRA adapters are not merged (`merge_on_export=False` or a "
                               "module without `merged_model()`): the zeros hold in the base weights only; merging "
                               "the adapters later fills them unless the masks are re-applied "
                               "(`SparsityResult.apply`)")
        self.result.apply(model)
        description = self.result.description(model)
        pl_module.weight_sparsity = description  # PrunableCausalLM.model_card writes it into lit_prune.json
        rank_zero_info(f"weight sparsity held through recovery: {description['measured']['overall']:.2%} zeros over "
                       f"{len(self.result.masks)} linears")
        return description

    def adopt_checkpoint(self, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """After the weights of a checkpoint loaded (``trainer.fit(ckpt_path=...)``): take its masks.

        Raises:
            ValueError: If the checkpoint's masks were made with other settings than this callback's.
        """
        data = (checkpoint.get(CHECKPOINT_KEY) or {}).get(SPARSITY_KEY)
        model = find_causal_lm(pl_module)
        if data is None:
            if self.result is not None:  # a checkpoint of a dense run: its weights just replaced the masked ones
                rank_zero_warn("the checkpoint holds no weight sparsity masks; re-applying this run's masks to its "
                               "weights")
                self.result.apply(model)
            return
        saved = SparsityResult.from_checkpoint(data)
        self._check_same_spec(saved.spec)
        if self.result is None or not self.result.same_masks(saved):
            saved.apply(model)
            if self.result is not None:
                rank_zero_info("adopted the checkpoint's weight sparsity masks (set `trainer.ckpt_path` before "
                               "`trainer.fit`, or use `python -m lit_prune fit --ckpt_path`, to skip calibration)")
            self.result, self._packed = saved, None
        self._applied_to = model

    # ------------------------------------------------------------------ helpers
    def _base_trains(self, pl_module: L.LightningModule) -> bool:
        if self.result is None:
            return False
        return any(linear.weight.requires_grad
                   for linear in self.result.linears(find_causal_lm(pl_module)).values())

    def _check_order(self, trainer: L.Trainer) -> None:
        callbacks = list(trainer.callbacks)
        position = next((i for i, c in enumerate(callbacks) if c is self), None)
        if position is None:
            return
        if any(c in callbacks[position + 1:] for c in prune_callbacks(trainer)):
            raise ValueError("WeightSparsityCallback comes before SelectivityPruneCallback in `trainer.callbacks`: the "
                             "masks must be computed on the sliced model; list WeightSparsityCallback after the prune "
                             "callback")

    def _check_same_spec(self, saved: SparsitySpec) -> None:
        mine, theirs = self.spec.to_dict(), saved.to_dict()
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            details = ", ".join(f"{k}: checkpoint {a!r}, callback {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"the checkpoint's weight sparsity ({saved.label}) was made with other settings than this "
                             f"WeightSparsityCallback ({self.spec.label}): {details}; resume with the same settings")

    @staticmethod
    def _checkpoint_masks(trainer: L.Trainer) -> SparsityResult | None:
        """The masks stored in the checkpoint the Trainer is about to resume from (``trainer.ckpt_path``), if any."""
        checkpoint = resume_checkpoint(trainer)
        data = None if checkpoint is None else (checkpoint.get(CHECKPOINT_KEY) or {}).get(SPARSITY_KEY)
        return None if data is None else SparsityResult.from_checkpoint(data)

    def _texts(self, trainer: L.Trainer, tokenizer) -> list[Text]:
        groups = ("target", "distractor") if self.calibration == "both" else (self.calibration,)
        texts = {g: self.texts[g] for g in groups}
        if any(t is None for t in texts.values()):
            from_data = datamodule_texts(trainer, tokenizer)
            if from_data is None:
                missing = [f"`{g}_prompts`" for g, t in texts.items() if t is None]
                raise ValueError(f"WeightSparsityCallback(calibration={self.calibration!r}) needs {' and '.join(missing)}"
                                 ", or a datamodule with `capture_texts(tokenizer)`")
            texts = {g: t if t is not None else list(from_data.get(g) or []) for g, t in texts.items()}
        for group, group_texts in texts.items():
            if not any(prompt.strip() for prompt, _ in group_texts):
                raise ValueError(f"the {group} calibration set is empty (calibration={self.calibration!r})")
        return [text for group in groups for text in texts[group]]

    def _calibration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list, dict]:
        tokenizer = find_tokenizer(pl_module, self.tokenizer)
        texts = self._texts(trainer, tokenizer)
        shard = texts[trainer.global_rank::trainer.world_size]
        batches = calibration_batches(tokenizer, shard, self.capture, self.max_length, self.batch_size)
        model = find_causal_lm(pl_module)
        hashed = (f"{p}\x01{r or ''}" if self.capture == "response" else p for p, r in texts)
        provenance = {"model": getattr(model.config, "_name_or_path", type(model).__name__),
                      "calibration": self.calibration, "texts": len(texts), "texts_hash": prompt_set_hash(hashed),
                      "capture": self.capture, "max_length": self.max_length, "world_size": trainer.world_size}
        return batches, provenance
