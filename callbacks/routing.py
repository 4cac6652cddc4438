"""DynamicDepthCallback: train per-token routers that skip decoder blocks (MoD, D-LLM, SkipGPT-style) inside the
same ``trainer.fit`` as LoRA recovery.

When. In ``setup`` for ``fit``, before ``configure_model`` wraps the model with LoRA, like the pruning callbacks:
it installs the routers of its :class:`~lit_prune.pruning.routing.RoutingSpec` (validated when the callback is
built, and against the model before any forward pass) on ``pl_module.model``. ``PrunableCausalLM`` keeps them
trainable after peft freezes the base (:func:`~lit_prune.pruning.routing.enable_router_training`), adds
:func:`~lit_prune.pruning.routing.routing_penalty` to the training loss (logged as ``train_routing_penalty``), and
evaluates the model against the dense one it came from (the label says ``<kind>-<ratio>``).

Logging. After every training batch the callback logs ``train_skip_rate``: the mean skip rate of the routed units over
that batch's forward passes (the routers count valid tokens only), then resets the counters.

Export. The routers are written into the module's export folder: ``routers.safetensors`` and ``routing.json`` beside
the plain Hugging Face checkpoint of the base weights (:func:`~lit_prune.pruning.routing.load_routed` loads both).
Lightning calls the callbacks' ``on_fit_end`` before the module's, which is where the export happens, so the callback
cannot add files afterwards; it registers a writer in ``pl_module.export_writers`` instead, which the export calls
inside its temporary folder before the marker ``lit_prune.json`` lists the files (and which puts the routing summary
in the model card).

Resume. The router weights are part of the module's state dict, so a checkpoint carries them; ``setup`` installs
fresh routers of the same spec before the checkpoint's weights load.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_prune.callbacks._utils import find_causal_lm
from lit_prune.pruning.routing import (
    RoutingSpec,
    install_routers,
    reset_skip_counters,
    routing_spec,
    save_routers,
    skip_rates,
)

__all__ = ["DynamicDepthCallback"]

log = logging.getLogger(__name__)

_WRITER = "routing"


def _export_routers(model: nn.Module, folder: Path) -> dict:
    """The export writer: the router files in ``folder``, and their summary for the model card."""
    return {"routing": save_routers(model, folder)}


class DynamicDepthCallback(Callback):
    """Install per-token block routers before LoRA wraps the model, log their skip rate, export them."""

    def __init__(
        self,
        kind: str = "dllm",
        ratio: float = 0.4,
        penalty_weight: float = 1.0,
        router_hidden: int = 64,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            kind: ``mod`` (Mixture-of-Depths: top-k capacity in training, a causal threshold taught by an auxiliary
                BCE loss at inference), ``dllm`` (D-LLM: straight-through Gumbel execute/skip per block, KV of skipped
                tokens evicted) or ``skip_mlp_attn`` (as ``dllm``, separate decisions for attention and MLP).
            ratio: Target fraction of tokens that skip each routed block (or sub-block), in (0, 1); for ``mod``,
                one minus the capacity.
            penalty_weight: Weight of the skip-rate penalty (``mod``: of the auxiliary BCE loss) in the loss, >= 0.
            router_hidden: Hidden width of the ``dllm`` / ``skip_mlp_attn`` router MLP (``mod``'s is linear).
            temperature: Gumbel-softmax temperature in training, > 0.
            seed: Seed of the routers' initial weights.

        Raises:
            ValueError: For an unknown ``kind``, a ``ratio`` outside (0, 1), a negative ``penalty_weight``, a
                ``router_hidden`` < 1, a ``temperature`` <= 0 or a non-integer ``seed``. A model without decoder
                blocks to route fails in ``setup``, before any forward pass.
        """
        super().__init__()
        self.spec = RoutingSpec(kind, ratio, penalty_weight, router_hidden, temperature, seed)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.install(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.log_skip_rate(pl_module, batch)

    # ------------------------------------------------------------------ the work
    def install(self, pl_module: L.LightningModule) -> None:
        """Install the routers on the module's model once, record the change and register the export writer.

        Raises:
            ValueError: If the model has no decoder blocks to route (see
                :func:`~lit_prune.pruning.routing.install_routers`) or has routers of another spec.
        """
        model = find_causal_lm(pl_module)
        current = routing_spec(model)
        if current == self.spec:
            return  # a second fit of the same module
        if current is not None:
            raise ValueError(f"the model already has routers ({current.label}); DynamicDepthCallback would install "
                             f"{self.spec.label}: start from the base model")
        if hasattr(pl_module, "record_modification"):
            pl_module.record_modification(self.spec.label)
        install_routers(model, self.spec)
        if hasattr(pl_module, "export_writers"):
            pl_module.export_writers[_WRITER] = _export_routers
        rank_zero_info(f"dynamic depth {self.spec.label}: routers on blocks 1-{model.config.num_hidden_layers - 1}")

    def log_skip_rate(self, pl_module: L.LightningModule, batch) -> None:
        """Log the mean skip rate of the routed units since the last call, then reset the counters."""
        model = find_causal_lm(pl_module)
        rates = [r for r in skip_rates(model).values() if not math.isnan(r)]
        reset_skip_counters(model)
        if rates:
            size = batch["input_ids"].shape[0] if isinstance(batch, dict) else None
            pl_module.log("train_skip_rate", sum(rates) / len(rates), prog_bar=True, batch_size=size)
