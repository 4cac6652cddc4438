"""Helpers shared by the pruning callbacks: find the Hugging Face model and tokenizer, resume state."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lit_prune.pruning.plan import CHECKPOINT_KEY, PrunePlan

log = logging.getLogger(__name__)


def find_causal_lm(pl_module: L.LightningModule) -> nn.Module:
    """The Hugging Face causal LM inside ``pl_module``: its ``model`` attribute, else the first submodule
    with a ``config`` and ``generate`` (a ``PreTrainedModel``).

    Raises:
        ValueError: If the LightningModule holds no such model.
    """
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    for module in pl_module.modules():
        if module is not pl_module and hasattr(module, "config") and hasattr(module, "generate"):
            return module
    raise ValueError(
        f"{type(pl_module).__name__} holds no Hugging Face causal LM: give it a `model` attribute with the "
        "`transformers` model (a PreTrainedModel)"
    )


def find_tokenizer(pl_module: L.LightningModule, explicit=None):
    """``explicit`` if given, else ``pl_module.tokenizer``; the pad token defaults to EOS.

    Raises:
        ValueError: If neither is available.
    """
    tokenizer = explicit if explicit is not None else getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"no tokenizer: pass `tokenizer=` to the callback or give {type(pl_module).__name__} a "
                         "`tokenizer` attribute")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def applied_plan(pl_module: L.LightningModule) -> PrunePlan | None:
    """The plan already applied to the module (``pl_module.prune_plan``), if any."""
    return getattr(pl_module, "prune_plan", None)


def resume_plan(trainer: L.Trainer) -> PrunePlan | None:
    """The plan stored in the checkpoint the Trainer is about to resume from, if any.

    Lightning only tells callbacks about the checkpoint during ``setup`` when it was set with
    ``trainer.ckpt_path = path`` before ``trainer.fit`` (the lit_prune CLI does this for ``--ckpt_path``).
    """
    path = trainer.ckpt_path
    if not path or not Path(path).is_file():
        return None
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    data = (checkpoint.get(CHECKPOINT_KEY) or {}).get("plan")
    return PrunePlan.from_dict(data) if data else None
