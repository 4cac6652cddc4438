"""Depth pruning: score whole decoder blocks, choose the least important ones and remove them physically.

Criteria (higher score = more important; the candidates with the lowest scores are removed):

===================  ===========================================================  ===================================
name                 score of block ``l``                                         source
===================  ===========================================================  ===================================
``block_influence``  ``BI_l = 1 - (1/T) sum_t cos(x_l,t, x_l+1,t)``: the block's   ShortGPT: Men et al., "ShortGPT:
                     input against its output, over the T valid tokens of the      Layers in Large Language Models are
                     calibration set (one forward pass)                            More Redundant Than You Expect"
                                                                                   (2024), arXiv:2403.03853, Eq. 1
``ppl``              ``exp(NLL / N)`` of the calibration labels with block ``l``   Shortened LLaMA: Kim et al.,
                     skipped alone (its output replaced by its input): one pass    "Shortened LLaMA: Depth Pruning for
                     per block                                                     LLMs" (2024), arXiv:2402.02834
``taylor_block``     ``sum over the block's weights w of |w * dL/dw|``, L the      Shortened LLaMA (Taylor criterion;
                     mean NLL of the labels (a backward pass per batch)            element-wise as the authors' code)
===================  ===========================================================  ===================================

``x_l`` is the hidden state entering block ``l`` and ``x_l+1`` the one leaving it (the residual stream).
The labels of ``ppl`` and ``taylor_block`` are the response tokens of a text that has a reference response
(teacher-forced, ``capture="response"``) and every token of a text without one; the calibration set is the
target texts, the distractor texts or both (:attr:`DepthSpec.calibration`, default ``target``). Every
criterion streams sums and token counts in float64 (never per-token tensors; ``taylor_block`` also keeps one
float32 salience buffer the size of the blocks' weights, as its reference code does), padding is masked, and the
sums pass through ``reduce`` (e.g. ``trainer.strategy.reduce(t, reduce_op="sum")``) before any division or
``abs``, so ranks that scored disjoint shards agree on the scores (exactly, up to float32 summation order for
``taylor_block``).

The one path, for the callbacks, the sweep and plain-torch users::

    spec = DepthSpec(num_blocks=2, criterion="block_influence")   # or ratio=0.1 of the parameters, or blocks=[5]
    spec.check_model(model)                                       # before any calibration pass
    plan = make_depth_plan(model, batches, spec)                  # batches: (input_ids, attention_mask, labels)
    plan.apply(model)                                             # remove the blocks, renumber, update config

Pieces a sweep calls directly: :func:`depth_scores` (the scores alone), :func:`remove_blocks`,
:func:`blocks_for_param_ratio` (a fraction of the model's parameters -> a block count) and
:func:`width_param_fraction` (the fraction of the model's parameters an MLP-neuron ratio removes: every layer
loses ``d_ff - kept_width`` neurons, each a gate row, an up row (with their biases) and a down column, so the
fraction is ``L * (d_ff - kept_width) * (2 d + d + biases) / params(dense)``). Width and depth are compared at
equal ``1 - params(pruned) / params(dense)``: ``DepthSpec(ratio=width_param_fraction(model, r, multiple_of))``.

Physical removal (:func:`remove_blocks`): the blocks leave the ``nn.ModuleList`` of decoder layers (its keys
are renumbered, so the state dict is a plain checkpoint of a shallower model); every remaining module's
``layer_idx`` (the KV cache's layer index) is set to its new position; per-layer config lists (``layer_types``
and any other ``*layer*`` list of length ``num_hidden_layers``) are trimmed, ``max_window_layers`` (Qwen2) is
recounted when it splits the layers, and ``config.num_hidden_layers`` is updated, so ``from_pretrained``
rebuilds the pruned model with no custom code.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from lit_prune.eval.resources import count_parameters
from lit_prune.pruning.engine import CAPTURE_TOKENS
from lit_prune.pruning.plan import CHECKPOINT_KEY, kept_width
from lit_prune.pruning.swiglu import _decoder_layers, find_swiglu_mlps

__all__ = [
    "CALIBRATION_SETS",
    "DEFAULT_DEPTH_CRITERION",
    "DEPTH_CRITERIA",
    "DEPTH_KEY",
    "DepthPlan",
    "DepthSpec",
    "blocks_for_param_ratio",
    "decoder_blocks",
    "depth_scores",
    "make_depth_plan",
    "read_checkpoint_depth_plan",
    "remove_blocks",
    "width_param_fraction",
]

log = logging.getLogger(__name__)

DEPTH_CRITERIA = ("block_influence", "ppl", "taylor_block")
# One forward pass, as cheap as the width capture; `ppl` costs one pass per block.
DEFAULT_DEPTH_CRITERION = "block_influence"
CALIBRATION_SETS = ("target", "distractor", "both")
# Sub-key of checkpoint[CHECKPOINT_KEY] that carries the depth plan (the width plan lives under "plan").
DEPTH_KEY = "depth"
# The plan of explicitly listed blocks (no criterion, no calibration pass).
EXPLICIT = "explicit"
_IGNORE = -100

Batch = Sequence[torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- the model
def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (``get_base_model()``), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (``model.model.layers`` for Qwen2/Llama), also under peft.

    Args:
        model: A Hugging Face causal LM, or a peft model around one.

    Returns:
        The model's own list (removing from it removes the blocks from the model).

    Raises:
        NotSwiGLUError: If the model has no list of decoder layers with an ``mlp`` child.
    """
    return _decoder_layers(_base_model(model))[1]


def _check_block_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` (decoder blocks to remove) must be an integer >= 1; got {value!r}")
    return value


def _check_param_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"`ratio` (fraction of the model's parameters to remove) must be in (0, 1); got {ratio!r}")
    return float(ratio)


def _check_indices(blocks, name: str = "blocks") -> tuple[int, ...]:
    values = list(blocks) if isinstance(blocks, (list, tuple)) else None
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in values) or len(
            set(values)) != len(values):
        raise ValueError(f"`{name}` must be a non-empty list of distinct block indices >= 0; got {blocks!r}")
    return tuple(sorted(values))


def _check_in_range(blocks: Sequence[int], num_layers: int, name: str = "blocks") -> None:
    outside = [b for b in blocks if not 0 <= b < num_layers]
    if outside:
        raise ValueError(f"`{name}`={list(blocks)} names block(s) {outside} but the model has {num_layers} blocks; "
                         f"allowed: indices 0-{num_layers - 1}")
    if len(blocks) >= num_layers:
        raise ValueError(f"`{name}`={list(blocks)} removes all {num_layers} blocks of the model; at least one block "
                         f"must remain (allowed: at most {num_layers - 1} blocks)")


def blocks_for_param_ratio(model: nn.Module, ratio: float) -> int:
    """The number of decoder blocks whose removal takes ``ratio`` of the model's parameters (nearest count).

    Every block of a Hugging Face decoder has the same size; ``count = round(ratio * params(model) /
    params(block))``, parameters counted once each (tied embeddings once).

    Args:
        model: The (dense) causal LM, possibly under peft.
        ratio: Fraction of the model's parameters to remove, in (0, 1).

    Returns:
        A block count in ``[1, num_layers - 1]``.

    Raises:
        ValueError: If ``ratio`` is outside (0, 1), rounds to zero blocks or to every block; the message gives the
            range of ratios that remove between one block and all but one.
    """
    ratio = _check_param_ratio(ratio)
    blocks = decoder_blocks(model)
    total = count_parameters(_base_model(model))
    per_block = sum(count_parameters(b) for b in blocks) / len(blocks)
    share = per_block / total
    count = math.floor(ratio / share + 0.5)
    if count < 1:
        raise ValueError(f"`ratio`={ratio} of the parameters rounds to 0 blocks (one of the model's {len(blocks)} "
                         f"blocks is {share:.2%} of its {total:,} parameters); allowed: a ratio of at least "
                         f"{0.5 * share:.4f}, or `num_blocks`")
    if count >= len(blocks):
        raise ValueError(f"`ratio`={ratio} of the parameters rounds to {count} blocks, but the model has "
                         f"{len(blocks)} and at least one must remain (allowed: a ratio below "
                         f"{(len(blocks) - 0.5) * share:.4f})")
    return count


def width_param_fraction(model: nn.Module, ratio: float, multiple_of: int = 128) -> float:
    """The fraction of the model's parameters that width pruning by the MLP-neuron ``ratio`` removes.

    Every layer keeps :func:`~lit_prune.pruning.plan.kept_width` neurons; each removed neuron takes a row of
    ``gate_proj`` and of ``up_proj`` (with their biases, if any) and a column of ``down_proj``. The result is the
    exact ``1 - params(pruned) / params(dense)`` of that plan, the depth ratio of equal size.

    Args:
        model: The dense causal LM.
        ratio: Nominal fraction of MLP neurons to remove, in (0, 1).
        multiple_of: Alignment of the kept width, as in the width plan.

    Returns:
        A fraction in (0, 1).

    Raises:
        ValueError: If ``ratio`` or ``multiple_of`` do not give a kept width (see ``kept_width``).
        NotSwiGLUError: If the model has no SwiGLU MLPs.
    """
    mlps = find_swiglu_mlps(model)
    width = mlps[0].width
    removed = width - kept_width(width, ratio, multiple_of)
    gate, up, down = mlps[0].gate_proj, mlps[0].up_proj, mlps[0].down_proj
    per_neuron = gate.in_features + up.in_features + down.out_features + (gate.bias is not None) + (up.bias is not None)
    return len(mlps) * removed * per_neuron / count_parameters(_base_model(model))


def _trim_config(config, kept: Sequence[int], total: int) -> None:
    """Keep the entries of the removed blocks' per-layer config lists out, and count the layers again."""
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, type(value)(value[i] for i in kept))
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int) and not isinstance(window, bool) and window < total:
        # Qwen2: the first `max_window_layers` layers use full attention; only kept ones are left of them.
        config.max_window_layers = sum(1 for i in kept if i < window)
    config.num_hidden_layers = len(kept)


@torch.no_grad()
def remove_blocks(model: nn.Module, blocks: Iterable[int]) -> nn.Module:
    """Remove decoder blocks ``blocks`` (original indices) from ``model`` in place and return it.

    The blocks leave the ``nn.ModuleList`` (whose keys are renumbered); every module of a remaining block that has
    a ``layer_idx`` (the attention's KV-cache index) gets its new position; the config's per-layer lists are
    trimmed, ``max_window_layers`` recounted and ``num_hidden_layers`` set (see the module docstring). Works on a
    peft-wrapped model too (its adapters in the removed blocks go with them).

    Args:
        model: A Hugging Face causal LM (or a peft model around one).
        blocks: Distinct indices of the blocks to remove.

    Returns:
        ``model``.

    Raises:
        ValueError: If ``blocks`` is empty, has repeats or negative entries, names a block the model does not have,
            would remove every block, or the config's ``num_hidden_layers`` disagrees with the model.
    """
    removed = _check_indices(list(blocks))
    base = _base_model(model)
    name, layers = _decoder_layers(base)
    total = len(layers)
    _check_in_range(removed, total)
    config = getattr(base, "config", None)
    declared = getattr(config, "num_hidden_layers", total)
    if declared != total:
        raise ValueError(f"config.num_hidden_layers={declared} but the model holds {total} decoder blocks")
    for index in reversed(removed):
        del layers[index]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    kept = [i for i in range(total) if i not in removed]
    if config is not None:
        _trim_config(config, kept, total)
        owner = base.get_submodule(name.rpartition(".")[0])
        if hasattr(owner, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
            owner.has_sliding_layers = "sliding_attention" in config.layer_types
    return model


# ---------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class DepthSpec:
    """Which decoder blocks to remove and how to choose them, checked when built.

    Give exactly one of ``num_blocks``, ``ratio`` or ``blocks``.

    Attributes:
        num_blocks: Blocks to remove, >= 1.
        ratio: Fraction of the model's parameters to remove, in (0, 1); rounded to the nearest block count
            (:func:`blocks_for_param_ratio`).
        blocks: Explicit block indices to remove (no criterion, no calibration pass).
        criterion: One of :data:`DEPTH_CRITERIA`.
        calibration: The texts the criterion is computed on: ``target`` (default), ``distractor`` or ``both``.
        capture: ``response`` (prompt + reference response, labels on the response) or ``prompt``.
        keep_first: Never remove block 0. Default True: Shortened LLaMA keeps the first and last blocks out of the
            candidates (its "+" heuristic), because the first block turns token embeddings into the residual
            stream every later block reads and the last one writes what the LM head reads; removing either is
            the costliest single removal on most models, and a one-block-at-a-time score (ppl, Taylor) can
            under-rate a block whose loss only shows once its neighbours are gone.
        keep_last: Never remove the last block (default True, for the same reason).
    """

    num_blocks: int | None = None
    ratio: float | None = None
    blocks: tuple[int, ...] | None = None
    criterion: str = DEFAULT_DEPTH_CRITERION
    calibration: str = "target"
    capture: str = "response"
    keep_first: bool = True
    keep_last: bool = True

    def __post_init__(self) -> None:
        given = [name for name in ("num_blocks", "ratio", "blocks") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of `num_blocks`, `ratio` or `blocks`; got {given or 'none'}")
        if self.num_blocks is not None:
            _check_block_count(self.num_blocks, "num_blocks")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _check_param_ratio(self.ratio))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", _check_indices(self.blocks))
        if self.criterion not in DEPTH_CRITERIA:
            raise ValueError(f"`criterion` must be one of {DEPTH_CRITERIA}; got {self.criterion!r}")
        if self.calibration not in CALIBRATION_SETS:
            raise ValueError(f"`calibration` must be one of {CALIBRATION_SETS}; got {self.calibration!r}")
        if self.capture not in CAPTURE_TOKENS:
            raise ValueError(f"`capture` must be one of {CAPTURE_TOKENS}; got {self.capture!r}")
        for name in ("keep_first", "keep_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false; got {getattr(self, name)!r}")
        if self.blocks is not None and self.keep_first and 0 in self.blocks:
            raise ValueError(f"`blocks`={list(self.blocks)} removes block 0 but `keep_first` is true; set `keep_first` "
                             "to false to remove the first block")

    @property
    def needs_data(self) -> bool:
        """Whether planning runs the calibration texts through the model (False for explicit ``blocks``)."""
        return self.blocks is None

    @property
    def groups(self) -> tuple[str, ...]:
        """The capture groups the calibration reads."""
        return ("target", "distractor") if self.calibration == "both" else (self.calibration,)

    def candidates(self, num_layers: int) -> list[int]:
        """Blocks the criterion may remove: all but the first / last when ``keep_first`` / ``keep_last``.

        Args:
            num_layers: The model's number of decoder blocks.

        Returns:
            Candidate block indices, in order.
        """
        first = 1 if self.keep_first else 0
        last = num_layers - 1 if self.keep_last else num_layers
        return list(range(first, last))

    def check_model(self, model: nn.Module) -> int:
        """Check the spec against ``model`` (before any calibration pass) and return the number of blocks to remove.

        Raises:
            ValueError: If ``blocks`` names a block the model does not have, or the count (given, or rounded from
                ``ratio``) would remove every block, rounds to zero blocks or exceeds the candidates that
                ``keep_first`` / ``keep_last`` leave; each message names the argument, the value and what is
                allowed.
            NotSwiGLUError: If the model has no list of decoder layers.
        """
        num_layers = len(decoder_blocks(model))
        if num_layers < 2:
            raise ValueError(f"the model has {num_layers} decoder block: depth pruning needs at least 2 (one remains)")
        if self.blocks is not None:
            _check_in_range(self.blocks, num_layers)
            if self.keep_last and num_layers - 1 in self.blocks:
                raise ValueError(f"`blocks`={list(self.blocks)} removes the last block ({num_layers - 1}) but "
                                 "`keep_last` is true; set `keep_last` to false to remove it")
            return len(self.blocks)
        if self.num_blocks is not None:
            count, given = self.num_blocks, f"`num_blocks`={self.num_blocks}"
            if count >= num_layers:
                raise ValueError(f"{given} removes all {num_layers} blocks of the model; at least one block must "
                                 f"remain (allowed: 1-{num_layers - 1})")
        else:
            count = blocks_for_param_ratio(model, self.ratio)
            given = f"`ratio`={self.ratio} ({count} blocks)"
        candidates = self.candidates(num_layers)
        if count > len(candidates):
            kept = [name for name in ("keep_first", "keep_last") if getattr(self, name)]
            raise ValueError(f"{given} exceeds the {len(candidates)} candidate block(s) of {num_layers} that "
                             f"{' and '.join(f'`{k}`' for k in kept)} leave (allowed: at most {len(candidates)}); "
                             "remove fewer blocks or set " + " / ".join(f"`{k}: false`" for k in kept))
        return count


# ---------------------------------------------------------------------------------------------------- scores
def _unpack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` without rows that have no valid token; labels default to every
    valid token."""
    input_ids, attention_mask = batch[0], batch[1]
    labels = batch[2] if len(batch) > 2 and batch[2] is not None else input_ids.masked_fill(attention_mask == 0,
                                                                                                _IGNORE)
    if input_ids.shape != attention_mask.shape or labels.shape != input_ids.shape:
        raise ValueError(f"`input_ids` {tuple(input_ids.shape)}, `attention_mask` {tuple(attention_mask.shape)} and "
                         f"`labels` {tuple(labels.shape)} must have the same shape")
    keep = attention_mask.sum(dim=1) > 0
    return input_ids[keep], attention_mask[keep], labels[keep]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_kwargs(model: nn.Module, logits: bool) -> dict:
    kwargs = {"use_cache": False}
    if not logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # block influence never reads the logits
    return kwargs


def _label_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of ``labels`` (``-100`` ignored) and the number of labelled tokens."""
    targets = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=_IGNORE,
                          reduction="sum")
    return nll.double(), (targets != _IGNORE).sum().double()


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _skipped(block: nn.Module) -> Iterator[None]:
    """Within the block, ``block`` passes its input through unchanged (its output is replaced by its input)."""

    def identity(module, args, kwargs, output):
        hidden = _block_input(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _reduced(tensor: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    return tensor if reduce is None else reduce(tensor)


@torch.no_grad()
def _block_influence(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Batch],
                     reduce: Reduce | None) -> tuple[torch.Tensor, dict]:
    device = _device(model)
    cosine_sums = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(module, args, kwargs, output) -> None:
            cosine = F.cosine_similarity(_block_input(args, kwargs).float(), _block_output(output).float(), dim=-1)
            cosine_sums[index] += (cosine * current["mask"]).sum().double()

        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    kwargs = _forward_kwargs(model, logits=False)
    try:
        for batch in batches:
            input_ids, attention_mask, _ = _unpack(batch)
            if not len(input_ids):
                continue
            current["mask"] = attention_mask.to(device, torch.float32)
            tokens += current["mask"].sum().double()
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    cosine_sums, tokens = _reduced(cosine_sums, reduce), _reduced(tokens, reduce)
    _check_tokens(tokens)
    return (1.0 - cosine_sums / tokens).cpu(), {"tokens": int(tokens)}


def _check_tokens(tokens: torch.Tensor) -> None:
    if float(tokens) <= 0:
        raise ValueError("no calibration tokens: every calibration text is empty or has no labelled token (with "
                         "`capture='response'` the labels are the response tokens: a `max_length` shorter than the "
                         "prompts cuts them all off; raise it)")


@torch.no_grad()
def _perplexity(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Batch],
                reduce: Reduce | None) -> tuple[torch.Tensor, dict]:
    device = _device(model)
    nll = torch.zeros(len(blocks) + 1, dtype=torch.float64, device=device)  # the last entry: no block skipped
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    kwargs = _forward_kwargs(model, logits=True)
    unpacked = [tuple(t.to(device) for t in _unpack(b)) for b in batches]
    unpacked = [b for b in unpacked if len(b[0])]
    for skip in range(len(blocks) + 1):
        with _skipped(blocks[skip]) if skip < len(blocks) else nullcontext():
            for input_ids, attention_mask, labels in unpacked:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
                batch_nll, batch_tokens = _label_nll(logits, labels)
                nll[skip] += batch_nll
                if skip == 0:
                    tokens += batch_tokens
    nll, tokens = _reduced(nll, reduce), _reduced(tokens, reduce)
    _check_tokens(tokens)
    perplexity = (nll / tokens).exp().cpu()
    return perplexity[:-1], {"tokens": int(tokens), "dense_ppl": float(perplexity[-1])}


def _taylor_block(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Batch],
                  reduce: Reduce | None) -> tuple[torch.Tensor, dict]:
    """Shortened LLaMA's Taylor score: ``sum_k |w_k * dL/dw_k|`` over the block's weight tensors (projections
    and norms, not biases), ``L`` the mean label NLL of the whole calibration set, as in the authors' code
    (``anal_block_sensitivity_taylor.py``: ``param * param.grad`` summed over batches, then ``abs`` per weight,
    summed over the weights of the block)."""
    device = _device(model)
    owners = [(index, p) for index, block in enumerate(blocks) for name, p in block.named_parameters()
              if name.endswith("weight")]
    params = [p for _, p in owners]
    trainable = [p.requires_grad for p in params]
    salience = [torch.zeros_like(p, dtype=torch.float32) for p in params]  # sum over batches of w * dNLL/dw
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            input_ids, attention_mask, labels = (t.to(device) for t in _unpack(batch))
            if not len(input_ids):
                continue
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                batch_nll, batch_tokens = _label_nll(logits, labels)
                if float(batch_tokens) <= 0:
                    continue
                # The summed NLL; divided by the total token count (all batches, all ranks) below.
                grads = torch.autograd.grad(batch_nll, params, allow_unused=True)
            tokens += batch_tokens
            for total, param, grad in zip(salience, params, grads):
                if grad is not None:
                    total.add_(param.detach().float() * grad.float())
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    tokens = _reduced(tokens, reduce)
    _check_tokens(tokens)
    sums = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    for (index, _), total in zip(owners, salience):  # ranks sum the per-weight salience before the abs
        sums[index] += _reduced(total, reduce).abs().double().sum()
    return (sums / tokens).cpu(), {"tokens": int(tokens)}


_SCORES = {"block_influence": _block_influence, "ppl": _perplexity, "taylor_block": _taylor_block}


def _scores(model: nn.Module, batches: Sequence[Batch], criterion: str,
            reduce: Reduce | None) -> tuple[torch.Tensor, dict]:
    if criterion not in _SCORES:
        raise ValueError(f"`criterion` must be one of {DEPTH_CRITERIA}; got {criterion!r}")
    was_training = model.training
    model.eval()
    try:
        scores, info = _SCORES[criterion](model, decoder_blocks(model), list(batches), reduce)
    finally:
        model.train(was_training)
    bad = [i for i, s in enumerate(scores.tolist()) if not math.isfinite(s)]
    if bad:
        raise FloatingPointError(f"non-finite {criterion} score of block(s) {bad}; check the model's dtype and weights")
    return scores, info


def depth_scores(model: nn.Module, batches: Iterable[Batch], criterion: str = DEFAULT_DEPTH_CRITERION,
                 reduce: Reduce | None = None) -> torch.Tensor:
    """Importance of every decoder block of ``model`` under ``criterion`` (higher = keep), float64 on the CPU.

    Args:
        model: The causal LM (run in eval mode; its mode and ``requires_grad`` flags are restored).
        batches: ``(input_ids, attention_mask[, labels])`` tensors; labels ``-100`` are ignored and default to
            every valid token. Rows without a valid token are skipped.
        criterion: One of :data:`DEPTH_CRITERIA` (formulas in the module docstring).
        reduce: Sums the streamed float64 sums and token counts across ranks (``trainer.strategy.reduce(t,
            reduce_op="sum")``); None for one process.

    Returns:
        A ``(num_layers,)`` tensor.

    Raises:
        ValueError: For an unknown criterion, mismatched shapes, or no calibration token at all.
        FloatingPointError: If a score is NaN or infinite.
    """
    return _scores(model, list(batches), criterion, reduce)[0]


# ---------------------------------------------------------------------------------------------------- the plan
def read_checkpoint_depth_plan(checkpoint: dict) -> DepthPlan | None:
    """The depth plan a Lightning checkpoint carries under ``checkpoint["lit_prune"]["depth"]``, if any.

    The one reader; :class:`~lit_prune.callbacks.DepthPruneCallback` is the one writer.

    Args:
        checkpoint: A loaded Lightning checkpoint.

    Returns:
        The plan, or None.
    """
    data = (checkpoint.get(CHECKPOINT_KEY) or {}).get(DEPTH_KEY)
    return DepthPlan.from_dict(data) if data else None


@dataclass
class DepthPlan:
    """Which decoder blocks were removed, how they were chosen and what it removed.

    Attributes:
        removed_blocks: Sorted original indices of the removed blocks.
        original_num_layers: Decoder blocks before pruning.
        criterion: The depth criterion, or ``explicit`` for a given list of blocks.
        scores: The criterion's score of every original block (higher = keep), or None.
        param_ratio: Exact ``1 - params(pruned) / params(dense)`` of the removal (on the model it was planned for).
        calibration: ``target``, ``distractor`` or ``both``.
        capture: ``response`` or ``prompt``.
        keep_first: Whether block 0 was kept out of the candidates.
        keep_last: Whether the last block was kept out of the candidates.
        provenance: Model name and fingerprint, calibration texts and hashes, the candidates in removal order.
    """

    removed_blocks: list[int]
    original_num_layers: int
    criterion: str
    scores: list[float] | None = None
    param_ratio: float = 0.0
    calibration: str = "target"
    capture: str = "response"
    keep_first: bool = True
    keep_last: bool = True
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.removed_blocks = list(_check_indices(self.removed_blocks, "removed_blocks"))
        _check_in_range(self.removed_blocks, self.original_num_layers, "removed_blocks")
        if self.scores is not None and len(self.scores) != self.original_num_layers:
            raise ValueError(f"`scores` must hold one score per original block ({self.original_num_layers}); got "
                             f"{len(self.scores)}")

    @property
    def num_layers(self) -> int:
        """Decoder blocks after pruning."""
        return self.original_num_layers - len(self.removed_blocks)

    @property
    def kept_blocks(self) -> list[int]:
        """Original indices of the remaining blocks, in order."""
        removed = set(self.removed_blocks)
        return [i for i in range(self.original_num_layers) if i not in removed]

    @property
    def label(self) -> str:
        """Short name, e.g. ``block_influence-2of24``."""
        return f"{self.criterion}-{len(self.removed_blocks)}of{self.original_num_layers}"

    def to_dict(self) -> dict:
        """The plan as plain data (JSON, checkpoints), with the derived ``num_layers`` and ``kept_blocks``."""
        data = asdict(self)
        data.update(num_layers=self.num_layers, kept_blocks=self.kept_blocks, format_version=1)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DepthPlan:
        """Rebuild a plan from :meth:`to_dict` output (derived keys are ignored).

        Raises:
            ValueError: If required keys are missing or the blocks do not fit the layer count.
        """
        missing = [k for k in ("removed_blocks", "original_num_layers", "criterion") if k not in data]
        if missing:
            raise ValueError(f"depth plan lacks keys {missing}")
        scores = data.get("scores")
        return cls(
            removed_blocks=[int(b) for b in data["removed_blocks"]],
            original_num_layers=int(data["original_num_layers"]),
            criterion=str(data["criterion"]),
            scores=None if scores is None else [float(s) for s in scores],
            param_ratio=float(data.get("param_ratio", 0.0)),
            calibration=str(data.get("calibration", "target")),
            capture=str(data.get("capture", "response")),
            keep_first=bool(data.get("keep_first", True)),
            keep_last=bool(data.get("keep_last", True)),
            provenance=dict(data.get("provenance", {})),
        )

    def check_model(self, model: nn.Module) -> None:
        """Raise unless ``model`` has the plan's original number of blocks.

        Raises:
            ValueError: Naming both counts.
        """
        count = len(decoder_blocks(model))
        if count != self.original_num_layers:
            name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
            raise ValueError(f"depth plan for {self.provenance.get('model', 'a model')!r} with "
                             f"{self.original_num_layers} blocks does not fit model {name!r} with {count} blocks")

    def is_applied(self, model: nn.Module) -> bool:
        """True if ``model`` (and its config) have the plan's remaining number of blocks."""
        config = getattr(_base_model(model), "config", None)
        return len(decoder_blocks(model)) == self.num_layers and getattr(config, "num_hidden_layers",
                                                                        self.num_layers) == self.num_layers

    def apply(self, model: nn.Module) -> nn.Module:
        """Remove the plan's blocks from the dense ``model`` in place (:func:`remove_blocks`) and return it.

        Raises:
            ValueError: If the model does not have the plan's original number of blocks.
        """
        self.check_model(model)
        return remove_blocks(model, self.removed_blocks)


def make_depth_plan(model: nn.Module, batches: Iterable[Batch], spec: DepthSpec, reduce: Reduce | None = None,
                    provenance: dict | None = None, scores: Sequence[float] | None = None) -> DepthPlan:
    """Score the blocks of ``model`` (unless ``spec.blocks`` lists them) and plan their removal.

    Args:
        model: The model to prune (not modified).
        batches: Calibration batches (see :func:`depth_scores`); ignored for explicit ``blocks``.
        spec: What to remove.
        reduce: Cross-rank sum of the streamed statistics (see :func:`depth_scores`).
        provenance: Extra provenance for the plan (model name, texts, ...).
        scores: The criterion's scores of this model's blocks, computed before (:func:`depth_scores`, e.g. once for
            several block counts); ``batches`` are then not read.

    Returns:
        The plan; the candidates in removal order (least important first) are in ``provenance["order"]``.

    Raises:
        ValueError: If the spec does not fit the model (see :meth:`DepthSpec.check_model`) or there is no
            calibration token.
        FloatingPointError: If a score is not finite.
    """
    count = spec.check_model(model)
    blocks = decoder_blocks(model)
    info = dict(provenance or {})
    started = time.perf_counter()
    if spec.blocks is not None:
        criterion, scores, removed = EXPLICIT, None, list(spec.blocks)
    else:
        if scores is None:
            tensor, extra = _scores(model, list(batches), spec.criterion, reduce)
            info.update(extra)
            scores = tensor.tolist()
        elif len(scores) != len(blocks):
            raise ValueError(f"`scores` must hold one score per block ({len(blocks)}); got {len(scores)}")
        scores = [float(v) for v in scores]
        order = sorted(spec.candidates(len(blocks)), key=lambda i: (scores[i], i))
        criterion, removed = spec.criterion, sorted(order[:count])
        info["order"] = order
    info["score_seconds"] = time.perf_counter() - started
    dense = count_parameters(_base_model(model))
    param_ratio = sum(count_parameters(blocks[i]) for i in removed) / dense
    plan = DepthPlan(removed, len(blocks), criterion, scores, param_ratio, spec.calibration, spec.capture,
                     spec.keep_first, spec.keep_last, info)
    log.info("planned depth %s: remove blocks %s of %d (%.2f%% of the parameters)", plan.label, removed, len(blocks),
             100 * param_ratio)
    return plan
