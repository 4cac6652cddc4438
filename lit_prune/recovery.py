"""LoRA recovery settings: the adapters (:class:`LoraSettings`, the paper's presets) and the learning-rate schedule.

Kept hand-written, and why:

- :class:`LoraSettings` is the four LoRA settings a recovery run needs, validated when the config is read (before
  any capture), that :func:`add_lora` turns into peft's ``LoraConfig``. peft's own dataclass has over 40 fields,
  several typed as unions of lists, strings and dicts that LightningCLI cannot type-check, and validates its
  target modules only when the model is wrapped, after the capture has run.
- :func:`lr_factor` rather than transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: that one starts
  the warm-up at a learning rate of 0 (the first optimizer step of a 20-40-step recovery run does nothing) and
  never reaches its floor within the run (``progress`` stops at ``(T - 1 - w) / (T - w)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

__all__ = ["LORA_PRESETS", "LR_SCHEDULES", "LoraSettings", "add_lora", "lr_factor"]

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


# Hyper-parameters in Lightning checkpoints hold LoraSettings; let `weights_only` loading accept it, also under the
# name checkpoints written before it moved here pickled (`lit_prune.module`, which still re-exports it).
torch.serialization.add_safe_globals([LoraSettings, (LoraSettings, "lit_prune.module.LoraSettings")])

# The paper's Table 7: learning rate and effective batch go with the Trainer / optimizer settings.
LORA_PRESETS = {
    "math": {"lora": LoraSettings(r=8, alpha=16, dropout=0.1), "learning_rate": 2e-5, "effective_batch": 8},
    "code": {"lora": LoraSettings(r=16, alpha=32, dropout=0.1), "learning_rate": 2e-4, "effective_batch": 16},
}


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped with peft LoRA adapters (only they train).

    Raises:
        ValueError: If a target module name matches no ``nn.Linear`` (the message lists the model's names).
    """
    from peft import LoraConfig, get_peft_model

    available = _linear_names(model)
    unknown = [t for t in settings.target_modules if t not in available]
    if unknown:
        raise ValueError(f"`lora.target_modules` {unknown} match no nn.Linear of the model; its Linear names are "
                         f"{available}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    rank_zero_info(f"LoRA r={settings.r} alpha={settings.alpha} on {list(settings.target_modules)}: "
                   f"{trainable:,} trainable parameters")
    return wrapped
