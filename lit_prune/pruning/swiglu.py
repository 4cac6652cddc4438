"""Find the SwiGLU MLP blocks of a decoder and slice their intermediate width.

A SwiGLU MLP computes ``down_proj(act(gate_proj(x)) * up_proj(x))``. Neuron ``n`` of the intermediate
width is row ``n`` of ``gate_proj`` and ``up_proj`` and column ``n`` of ``down_proj``; removing a set of
neurons keeps rows ``K`` of gate/up and columns ``K`` of down (the paper's Eq. 11-13). Blocks are found
by structure (three ``nn.Linear`` children with these names and matching shapes), which covers Qwen2,
Qwen2.5, Qwen3, Llama and Mistral in ``transformers`` without a list of class names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLPBlock", "NotSwiGLUError", "find_swiglu_mlps", "slice_mlp", "slice_model"]

log = logging.getLogger(__name__)

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _linear(module: nn.Module | None) -> nn.Linear | None:
    """``module`` if it is an ``nn.Linear``, or the Linear a peft adapter wraps (``base_layer``)."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Linear) else None


class NotSwiGLUError(ValueError):
    """The model (or one of its MLPs) is not a gate/up/down SwiGLU block."""


@dataclass(frozen=True)
class MLPBlock:
    """One decoder layer's SwiGLU MLP.

    Attributes:
        layer_index: Position of the decoder layer.
        name: Qualified module name, e.g. ``model.layers.3.mlp``.
        module: The MLP module itself.
    """

    layer_index: int
    name: str
    module: nn.Module

    @property
    def gate_proj(self) -> nn.Linear:
        return _linear(self.module.gate_proj)

    @property
    def up_proj(self) -> nn.Linear:
        return _linear(self.module.up_proj)

    @property
    def down_proj(self) -> nn.Linear:
        """The ``down_proj`` Linear (the base layer under a LoRA adapter); its input is ``h``."""
        return _linear(self.module.down_proj)

    @property
    def width(self) -> int:
        """Current intermediate width (number of neurons)."""
        return self.down_proj.in_features


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the name and the ``ModuleList`` of decoder layers (the longest list whose items hold an ``mlp``)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        mlp_like = [n for n, m in model.named_modules() if n.endswith(("mlp", "fc1", "intermediate", "c_fc"))][:3]
        raise NotSwiGLUError(
            f"{type(model).__name__} has no list of decoder layers with an `mlp` child, so it has no SwiGLU MLPs to "
            f"prune (MLP-like modules found: {mlp_like or 'none'}). Supported: models whose layers have "
            "`mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj` (Qwen2/2.5/3, Llama, Mistral)."
        )
    return best


def _check_block(name: str, mlp: nn.Module) -> None:
    missing = [p for p in _PROJECTIONS if _linear(getattr(mlp, p, None)) is None]
    if missing:
        children = [n for n, _ in mlp.named_children()]
        raise NotSwiGLUError(
            f"module `{name}` ({type(mlp).__name__}, children {children}) is not a SwiGLU MLP: it lacks nn.Linear "
            f"{missing}. Supported: gate_proj/up_proj/down_proj MLPs (Qwen2/2.5/3, Llama, Mistral)."
        )
    gate, up, down = (_linear(getattr(mlp, p)) for p in _PROJECTIONS)
    if not (gate.out_features == up.out_features == down.in_features and gate.in_features == up.in_features):
        raise NotSwiGLUError(
            f"module `{name}` has inconsistent SwiGLU shapes: gate {tuple(gate.weight.shape)}, "
            f"up {tuple(up.weight.shape)}, down {tuple(down.weight.shape)}"
        )


def find_swiglu_mlps(model: nn.Module) -> list[MLPBlock]:
    """List the SwiGLU MLP of every decoder layer, in layer order.

    Args:
        model: A Hugging Face causal LM (or its base model), possibly wrapped by peft.

    Returns:
        One :class:`MLPBlock` per decoder layer.

    Raises:
        NotSwiGLUError: If the model has no decoder layers with an ``mlp`` or one of them is not SwiGLU;
            the message names the module that does not fit.
    """
    layers_name, layers = _decoder_layers(model)
    blocks = []
    for index, layer in enumerate(layers):
        name = f"{layers_name}.{index}.mlp"
        _check_block(name, layer.mlp)
        blocks.append(MLPBlock(index, name, layer.mlp))
    return blocks


def _take(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` holding ``linear``'s weights restricted to ``index`` along ``dim`` (0 rows, 1 cols)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device)).clone()
    elif bias is not None:
        bias = bias.detach().clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def _as_index(kept: Sequence[int] | torch.Tensor, width: int, where: str) -> torch.Tensor:
    index = torch.as_tensor(kept, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError(f"kept indices for `{where}` are empty; at least one neuron must be kept")
    if index.min() < 0 or index.max() >= width:
        raise ValueError(
            f"kept indices for `{where}` must lie in [0, {width}); got min {int(index.min())}, max {int(index.max())}"
        )
    if not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"kept indices for `{where}` must be strictly increasing (original neuron order, no repeats)")
    return index


def slice_mlp(block: MLPBlock, kept: Sequence[int] | torch.Tensor) -> None:
    """Keep only neurons ``kept`` of one SwiGLU MLP, in place.

    Args:
        block: The MLP to slice.
        kept: Strictly increasing neuron indices to keep.

    Raises:
        ValueError: If ``kept`` is empty, out of range or not strictly increasing.
    """
    index = _as_index(kept, block.width, block.name)
    mlp = block.module
    if not isinstance(mlp.down_proj, nn.Linear):
        raise ValueError(f"`{block.name}` carries LoRA adapters; prune before adding adapters (or merge them first)")
    mlp.gate_proj = _take(mlp.gate_proj, index, dim=0)
    mlp.up_proj = _take(mlp.up_proj, index, dim=0)
    mlp.down_proj = _take(mlp.down_proj, index, dim=1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(index.numel())


def slice_model(model: nn.Module, kept_per_layer: Sequence[Sequence[int] | torch.Tensor]) -> None:
    """Slice every decoder MLP of ``model`` in place and update ``config.intermediate_size``.

    All layers must keep the same number of neurons, because Hugging Face configs store one
    ``intermediate_size`` and ``from_pretrained`` must rebuild the same shapes without custom code.

    Args:
        model: A Hugging Face causal LM with SwiGLU MLPs.
        kept_per_layer: One index set per decoder layer.

    Raises:
        ValueError: If the number of index sets differs from the number of layers, or the widths differ.
        NotSwiGLUError: If the model has no SwiGLU MLPs.
    """
    blocks = find_swiglu_mlps(model)
    if len(kept_per_layer) != len(blocks):
        raise ValueError(f"`kept_per_layer` has {len(kept_per_layer)} entries but the model has {len(blocks)} layers")
    widths = {len(k) for k in kept_per_layer}
    if len(widths) != 1:
        raise ValueError(f"every layer must keep the same number of neurons; got widths {sorted(widths)}")
    for block, kept in zip(blocks, kept_per_layer):
        slice_mlp(block, kept)
    config = getattr(model, "config", None)
    if config is not None:
        # peft wraps the model; its config is the underlying model's one.
        config.intermediate_size = widths.pop()
