"""Dynamic depth: per-token routers that let tokens skip decoder blocks (or their attention / MLP sub-blocks).

Kinds (``RoutingSpec.kind``); every routed unit of block ``l`` decides per token from that token's own hidden
state ``x_t`` (RMS-normalised, no learned scale) whether it runs:

=================  ================================================================  ================================
kind               decision and output of a routed block                             source
=================  ================================================================  ================================
``mod``            scalar router ``r_t = w . x_t + b``. Training: the top-k tokens   Mixture-of-Depths: Raposo et al.
                   of each sequence by ``r_t`` run the block, ``k = round((1 -       (2024), arXiv:2404.02258, Sec.
                   ratio) * T_valid)``; output ``x_t + sigmoid(r_t) f(x_t)`` for     3.1-3.4 (Eq. 1), with the
                   the chosen, ``x_t`` for the others. Inference (causal): a token   sigmoid of the router logit as
                   runs iff ``r_t > 0``; the router is taught this by MoD's          the weight; Sec. 3.5 (first
                   auxiliary loss, BCE of ``r_t`` against top-k membership           method: auxiliary BCE loss on
                   (``penalty_weight`` times the mean over routed blocks)            the router itself)
``dllm``           two-way MLP router (``x -> router_hidden -> SiLU -> (execute,     D-LLM: Jiang et al. (2024),
                   skip)``). Training: straight-through Gumbel-softmax               NeurIPS (dynamic decision
                   (``hard=True``: forward decision, soft gradient); output ``x_t +  module, execution-rate target,
                   g_t f(x_t)``. Inference: ``argmax``. Penalty: ``penalty_weight *  KV eviction policy)
                   (s - ratio)^2`` with ``s`` the mean skip probability of the
                   routed blocks
``skip_mlp_attn``  as ``dllm`` with one router for the attention sub-block (on the   SkipGPT (decoupled attention /
                   block input) and one for the MLP sub-block (on the residual       MLP routing); its code is not
                   after attention); ``s`` is weighted by the sub-blocks' parameter  public, built from the paper's
                   counts                                                            description
=================  ================================================================  ================================

``skip_mlp_attn``, what is built from SkipGPT's description: per-token routing with attention and MLP decided
separately (attention on the block input, MLP on the residual after the attention), each a binary straight-through
decision, and one sparsity target over both; what is not: its staged schedule (routers tuned first with the model
frozen, LoRA after), here routers and LoRA train together in one loop.

Block 0 is never routed: it turns embeddings into the residual stream (the reason depth pruning keeps it,
``DepthSpec.keep_first``), and its KV cache stays complete, so ``generate`` (which reads the sequence length of layer
0's cache for positions and input slicing) works unchanged. ``ratio`` is the target skip rate of the routed units
(blocks 1..L-1); :func:`active_param_ratio` gives the study's whole-model ratio ``1 - active params per token /
dense`` from measured skip rates.

KV cache (D-LLM's eviction policy): a token that skips a block's attention writes no key/value at that layer, and
later tokens do not attend to it there. Training and full forwards (no cache, any batch) compute every token and mask:
keys of skipped tokens are removed from the attention mask, and the skipped tokens' outputs are discarded (each query
keeps its own key so no row of the mask is empty). With a cache (batch 1: generation), only the tokens that run are
gathered, with their own rotary positions, through the block; the others run nothing there (no norm, projection,
attention or MLP), which is where the compute is saved. A batch of several sequences with a cache (rows skip different
tokens, so evicted caches would be ragged) writes every token's K/V and masks the skipped tokens' keys with the
decisions it remembers: the same tokens, without the saving. All paths give the same result (tested); beam search
(which reorders the cache) is refused.

Storage: routers are submodules ``<block>.routing`` of the model (they move with ``.to()`` and train with it), and
their keys are added to the model's ``_keys_to_ignore_on_save``, so ``save_pretrained`` still writes a plain
checkpoint of the original architecture. :func:`save_routers` writes ``routers.safetensors`` and ``routing.json``
(kind, settings, routed blocks, measured skip rates, the base architecture's fingerprint) beside it, and
:func:`load_routed` loads both; :func:`load_routers` refuses routers trained for another architecture.

The one path::

    spec = RoutingSpec(kind="dllm", ratio=0.4)
    install_routers(model, spec)             # in place; before peft wraps the model
    loss = lm_loss + routing_penalty(model)  # in training mode; None for a model without routers
    model.eval(); model.generate(...)        # causal decisions, skipped blocks not run
    save_routers(model, folder); load_routed(folder)
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lit_prune.eval.resources import count_parameters
from lit_prune.io import atomic_write_bytes, atomic_write_text
from lit_prune.pruning.swiglu import NotSwiGLUError, _decoder_layers

__all__ = [
    "ROUTERS_FILENAME",
    "ROUTING_FILENAME",
    "ROUTING_KINDS",
    "BlockRouters",
    "RoutingSpec",
    "active_param_ratio",
    "enable_router_training",
    "install_routers",
    "load_routed",
    "load_routers",
    "reset_skip_counters",
    "routed_param_ratio",
    "routers_of",
    "routing_penalty",
    "routing_spec",
    "save_routers",
    "skip_rates",
]

log = logging.getLogger(__name__)

ROUTING_KINDS = ("mod", "dllm", "skip_mlp_attn")
ROUTERS_FILENAME = "routers.safetensors"
ROUTING_FILENAME = "routing.json"
_UNITS = {"mod": ("block",), "dllm": ("block",), "skip_mlp_attn": ("attn", "mlp")}
_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
_BLOCK_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# Routers start with p(execute) = 0.9 for every token, so the retrofitted model starts close to the dense one.
_INITIAL_EXECUTE_LOGIT = math.log(9.0)
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class RoutingSpec:
    """What routers to install, checked when built.

    Attributes:
        kind: One of :data:`ROUTING_KINDS` (see the module docstring).
        ratio: Target fraction of tokens that skip each routed unit, in (0, 1) (``mod``: 1 - capacity).
        penalty_weight: Weight of the skip-rate penalty (``dllm``, ``skip_mlp_attn``) or of MoD's auxiliary BCE
            loss (``mod``) in the training loss, >= 0.
        router_hidden: Hidden width of the ``dllm`` / ``skip_mlp_attn`` router MLP, >= 1 (``mod``'s router is
            linear, as in MoD).
        temperature: Gumbel-softmax temperature of ``dllm`` / ``skip_mlp_attn`` training, > 0.
        seed: Seed of the routers' initial weights (ranks and reruns agree).
    """

    kind: str = "dllm"
    ratio: float = 0.4
    penalty_weight: float = 1.0
    router_hidden: int = 64
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROUTING_KINDS:
            raise ValueError(f"`kind` must be one of {ROUTING_KINDS}; got {self.kind!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"`ratio` (target fraction of tokens that skip a routed block) must be in (0, 1); got "
                             f"{self.ratio!r}")
        if isinstance(self.penalty_weight, bool) or not isinstance(self.penalty_weight, (int, float)) or not (
                self.penalty_weight >= 0 and math.isfinite(self.penalty_weight)):
            raise ValueError(f"`penalty_weight` must be a finite number >= 0; got {self.penalty_weight!r}")
        if isinstance(self.router_hidden, bool) or not isinstance(self.router_hidden, int) or self.router_hidden < 1:
            raise ValueError(f"`router_hidden` must be an integer >= 1; got {self.router_hidden!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
                self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"`temperature` must be a finite number > 0; got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer; got {self.seed!r}")

    @property
    def label(self) -> str:
        """Short name, e.g. ``dllm-40%``."""
        return f"{self.kind}-{self.ratio:.0%}"

    def to_dict(self) -> dict:
        """The spec as plain data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RoutingSpec:
        """Rebuild a spec from :meth:`to_dict` output (missing settings take their defaults)."""
        return cls(**{k: data[k] for k in ("kind", "ratio", "penalty_weight", "router_hidden", "temperature", "seed")
                      if k in data})


# ---------------------------------------------------------------------------------------------------- routers
class TokenRouter(nn.Module):
    """One unit's router: logits from each token's RMS-normalised hidden state, and its skip counters.

    Attributes:
        skipped_tokens: Valid tokens that skipped the unit since the last :func:`reset_skip_counters` (int64, not
            saved).
        seen_tokens: Valid tokens the unit decided on since then.
        last_term: The unit's differentiable penalty term of the last training forward (mean skip probability, or
            MoD's BCE), consumed by :func:`routing_penalty`.
    """

    def __init__(self, hidden_size: int, outputs: int, router_hidden: int | None) -> None:
        """
        Args:
            hidden_size: Width of the residual stream.
            outputs: 1 (MoD's scalar score) or 2 (execute, skip logits).
            router_hidden: Hidden width of a two-layer router; None for a linear one.
        """
        super().__init__()
        if router_hidden is None:
            self.proj = nn.Linear(hidden_size, outputs)
            head = self.proj
        else:
            self.proj = nn.Sequential(nn.Linear(hidden_size, router_hidden), nn.SiLU(),
                                      nn.Linear(router_hidden, outputs))
            head = self.proj[-1]
        with torch.no_grad():
            head.weight.mul_(0.1)  # small token-to-token differences at first; the bias sets p(execute)
            head.bias.zero_()
            head.bias[0] = _INITIAL_EXECUTE_LOGIT
        self.register_buffer("skipped_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self.last_term: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, tokens, outputs)`` of ``hidden`` ``(batch, tokens, hidden_size)``."""
        weight = next(self.parameters())
        normed = F.rms_norm(hidden.to(weight.dtype), (hidden.shape[-1],))
        return self.proj(normed)

    def count(self, executed: torch.Tensor, valid: torch.Tensor) -> None:
        """Add the valid tokens of one decision to the counters."""
        self.skipped_tokens += (valid & ~executed).sum()
        self.seen_tokens += valid.sum()


@dataclass
class _Gate:
    """One unit's decision on a sequence: which tokens run, and the weight of their output."""

    executed: torch.Tensor  # (batch, tokens) bool
    weight: torch.Tensor  # (batch, tokens) float, 0 where skipped (straight-through where trained)


class BlockRouters(nn.Module):
    """The routers of one decoder block (``block.routing``): one unit ``block``, or ``attn`` and ``mlp``.

    Attributes:
        spec: The routing spec.
        unit_params: Parameters of the decoder block each unit skips (before any LoRA).
        token_mask: The ``(batch, tokens)`` padding mask of the current forward (set by the decoder's pre-hook),
            or None when every token is valid.
        key_history: ``(batch, cached tokens)``: which cached tokens ran the attention, for a batch of several
            sequences generating with a cache (see :meth:`remember_keys`).
    """

    def __init__(self, spec: RoutingSpec, hidden_size: int, unit_params: dict[str, int]) -> None:
        """
        Args:
            spec: The routing spec (its kind gives the units).
            hidden_size: Width of the residual stream.
            unit_params: Parameters of each unit's part of the block.
        """
        super().__init__()
        self.spec = spec
        self.unit_params = dict(unit_params)
        outputs, hidden = (1, None) if spec.kind == "mod" else (2, spec.router_hidden)
        self.routers = nn.ModuleDict({unit: TokenRouter(hidden_size, outputs, hidden) for unit in _UNITS[spec.kind]})
        self.token_mask: torch.Tensor | None = None
        self.key_history: torch.Tensor | None = None

    def valid(self, hidden: torch.Tensor) -> torch.Tensor:
        """Which tokens of ``hidden`` are not padding: the last ``tokens`` columns of the padding mask."""
        batch, tokens = hidden.shape[:2]
        mask = self.token_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < tokens:
            return torch.ones(batch, tokens, dtype=torch.bool, device=hidden.device)
        return mask[:, -tokens:].to(device=hidden.device, dtype=torch.bool)

    def remember_keys(self, cache, layer_idx: int, executed: torch.Tensor) -> torch.Tensor:
        """Which of the cached keys (and the new ones) ran the attention, for a batch that writes every token's K/V.

        Raises:
            ValueError: If the cache holds tokens these routers did not decide on (e.g. reordered by beam search).
        """
        past = cache.get_seq_length(layer_idx)
        history = self.key_history if past else executed[:, :0]
        if history is None or history.shape != (executed.shape[0], past):
            raise ValueError(f"the KV cache of block {layer_idx} holds {past} tokens its routers did not decide on (a "
                             "cache reordered by beam search, or filled by another model): routed generation "
                             "supports greedy decoding and sampling")
        self.key_history = torch.cat([history, executed], dim=1)
        return self.key_history

    def gate(self, unit: str, hidden: torch.Tensor, valid: torch.Tensor) -> _Gate:
        """Decide which tokens of ``hidden`` run ``unit``; count them; keep the penalty term when training."""
        router = self.routers[unit]
        logits = router(hidden)
        trained = self.training and torch.is_grad_enabled()
        gate = (_mod_gate if self.spec.kind == "mod" else _gumbel_gate)(router, logits, valid, self.spec, trained)
        router.count(gate.executed, valid)
        return gate


def _mod_gate(router: TokenRouter, logits: torch.Tensor, valid: torch.Tensor, spec: RoutingSpec,
              trained: bool) -> _Gate:
    """MoD: top-k of the sequence in training (with the auxiliary BCE term), ``r > 0`` at inference."""
    score = logits[..., 0]
    if trained:
        capacity = torch.floor((1.0 - spec.ratio) * valid.sum(dim=1) + 0.5)  # k per row, over valid tokens
        order = score.detach().masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(
            order))
        executed = (ranks < capacity[:, None]) & valid
        if valid.any():
            router.last_term = F.binary_cross_entropy_with_logits(score[valid], executed[valid].to(score.dtype))
    else:
        executed = score > 0
    return _Gate(executed, executed * torch.sigmoid(score))


def _gumbel_gate(router: TokenRouter, logits: torch.Tensor, valid: torch.Tensor, spec: RoutingSpec,
                 trained: bool) -> _Gate:
    """D-LLM: a straight-through Gumbel-softmax sample in training (skip probability kept), argmax at inference."""
    if trained:
        weight = F.gumbel_softmax(logits, tau=spec.temperature, hard=True)[..., 0]
        if valid.any():
            router.last_term = logits.softmax(-1)[..., 1][valid].mean()
        return _Gate(weight > 0.5, weight)
    executed = logits[..., 0] >= logits[..., 1]
    return _Gate(executed, executed.to(logits.dtype))


# ---------------------------------------------------------------------------------------------------- masks
def _implementation(block: nn.Module) -> str:
    return block.self_attn.config._attn_implementation


def _as_implementation_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask as the attention implementation takes it (eager adds a float mask)."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    return allowed


def _evicting_mask(mask: torch.Tensor | None, kept_keys: torch.Tensor, queries: int, implementation: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """The block's causal (and padding) mask without the keys of tokens that skipped its attention.

    Args:
        mask: The mask the model made for the block (None, boolean, or float with 0 where attended).
        kept_keys: ``(batch, keys)``: whether each key's token ran the block's attention; the last ``queries`` keys
            are the queries' own.
        queries: Number of query tokens.
        implementation: The attention implementation (``eager`` takes a float mask).
        dtype: dtype of a float mask.

    Each query keeps its own key, so a skipped token's row (whose output is discarded) is never empty.
    """
    keys = kept_keys.shape[1]
    key_positions = torch.arange(keys, device=kept_keys.device)
    query_positions = keys - queries + torch.arange(queries, device=kept_keys.device)
    own = key_positions[None, :] == query_positions[:, None]
    if mask is None:
        allowed = (key_positions[None, :] <= query_positions[:, None])[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0  # Hugging Face float masks: 0 where attended, the dtype's minimum elsewhere
    allowed = (allowed[..., -keys:] & kept_keys[:, None, None, :]) | own
    return _as_implementation_mask(allowed, implementation, dtype)


def _cached_causal_mask(queries: int, past: int, implementation: str, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor | None:
    """Causal mask of ``queries`` new tokens over ``past`` cached ones plus themselves (None for one query)."""
    if queries == 1:
        return None
    keys = torch.arange(past + queries, device=device)
    allowed = keys[None, :] <= (past + torch.arange(queries, device=device))[:, None]
    return _as_implementation_mask(allowed[None, None], implementation, dtype)


# ---------------------------------------------------------------------------------------------------- the forward
def _attention(block: nn.Module, hidden: torch.Tensor, mask, position_embeddings, position_ids, cache,
               kwargs: dict) -> torch.Tensor:
    output, _ = block.self_attn(hidden_states=block.input_layernorm(hidden), attention_mask=mask,
                                position_ids=position_ids, cache=cache, position_embeddings=position_embeddings,
                                **kwargs)
    return output


def _mlp(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return block.mlp(block.post_attention_layernorm(hidden))


def _gathered(executed: torch.Tensor) -> torch.Tensor:
    """Positions (batch 1) of the tokens that run."""
    return executed[0].nonzero().squeeze(1)


def _cached_attention(block: nn.Module, hidden: torch.Tensor, index: torch.Tensor, position_embeddings,
                      position_ids, cache, kwargs: dict) -> torch.Tensor:
    """Attention of the gathered tokens ``index`` (batch 1): only they write K/V and are attended to."""
    cos, sin = position_embeddings
    past = cache.get_seq_length(block.self_attn.layer_idx)
    mask = _cached_causal_mask(len(index), past, _implementation(block), hidden.dtype, hidden.device)
    ids = None if position_ids is None else position_ids[:, index]
    return _attention(block, hidden[:, index], mask, (cos[:, index], sin[:, index]), ids, cache, kwargs)


def _scaled(gate: _Gate, index: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    weight = gate.weight if index is None else gate.weight[:, index]
    return weight[..., None].to(delta.dtype) * delta


def _masked_forward(block: nn.Module, hidden: torch.Tensor, gate: _Gate, valid: torch.Tensor, attention_mask,
                    position_embeddings, position_ids, cache, kwargs: dict) -> torch.Tensor:
    """Every token computed, the skipped ones' keys masked and outputs discarded (no cache, or a batch with one)."""
    routing: BlockRouters = block.routing
    kept = gate.executed if cache is None else routing.remember_keys(cache, block.self_attn.layer_idx, gate.executed)
    mask = _evicting_mask(attention_mask, kept, hidden.shape[1], _implementation(block), hidden.dtype)
    attended = _attention(block, hidden, mask, position_embeddings, position_ids, cache, kwargs)
    if routing.spec.kind != "skip_mlp_attn":
        return hidden + _scaled(gate, None, attended + _mlp(block, hidden + attended))
    hidden = hidden + _scaled(gate, None, attended)
    return hidden + _scaled(routing.gate("mlp", hidden, valid), None, _mlp(block, hidden))


def _gathered_forward(block: nn.Module, hidden: torch.Tensor, gate: _Gate, valid: torch.Tensor,
                      position_embeddings, position_ids, cache, kwargs: dict) -> torch.Tensor:
    """One sequence with a cache: only the tokens that execute run the block (and write K/V); the others skip it."""
    routing: BlockRouters = block.routing
    index = _gathered(gate.executed)
    if len(index):
        attended = _cached_attention(block, hidden, index, position_embeddings, position_ids, cache, kwargs)
        if routing.spec.kind != "skip_mlp_attn":
            delta = attended + _mlp(block, hidden[:, index] + attended)
            return hidden.index_add(1, index, _scaled(gate, index, delta))
        hidden = hidden.index_add(1, index, _scaled(gate, index, attended))
    if routing.spec.kind != "skip_mlp_attn":
        return hidden
    mlp_gate = routing.gate("mlp", hidden, valid)
    index = _gathered(mlp_gate.executed)
    if not len(index):
        return hidden
    return hidden.index_add(1, index, _scaled(mlp_gate, index, _mlp(block, hidden[:, index])))


def _routed_forward(block: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, cache=None, use_cache: bool | None = False,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """The decoder block's forward with its routers (installed as ``block.forward``): the signature and output of
    Qwen2's and Llama's decoder layers (``use_cache`` is accepted; as there, the cache object decides).

    Without a cache, and for a batch of several sequences with one, every token is computed and the skipped ones are
    masked out (a batch writes every token's K/V and remembers which ran); one sequence with a cache runs only the
    tokens that execute (see the module docstring).
    """
    routing: BlockRouters = block.routing
    valid = routing.valid(hidden_states)
    gate = routing.gate(_UNITS[routing.spec.kind][0], hidden_states, valid)
    if cache is None or hidden_states.shape[0] > 1:
        return _masked_forward(block, hidden_states, gate, valid, attention_mask, position_embeddings, position_ids,
                               cache, kwargs)
    return _gathered_forward(block, hidden_states, gate, valid, position_embeddings, position_ids, cache, kwargs)


def _record_token_mask(routers: list[BlockRouters], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder stack: hand the 2-D padding mask of this forward to every block's routers."""
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    for routing in routers:
        routing.token_mask = mask


# ---------------------------------------------------------------------------------------------------- install
def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (``get_base_model()``), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and list of decoder blocks of ``model``.

    Raises:
        ValueError: If there is none, or its blocks lack the pre-norm attention + MLP parts routing runs.
    """
    base = _base_model(model)
    try:
        name, blocks = _decoder_layers(base)
    except NotSwiGLUError:
        raise ValueError(f"routers need a list of decoder blocks, each with {list(_BLOCK_PARTS)} (Qwen2, Llama, "
                         f"Mistral); {type(base).__name__} has no such list") from None
    missing = [p for p in _BLOCK_PARTS if not hasattr(blocks[0], p)]
    if missing:
        raise ValueError(f"routers need decoder blocks with {list(_BLOCK_PARTS)}; {type(blocks[0]).__name__} in "
                         f"`{name}` lacks {missing}")
    return name, blocks


def routers_of(model: nn.Module) -> list[tuple[int, BlockRouters]]:
    """The ``(block index, routers)`` of every routed block of ``model`` (empty without routers)."""
    try:
        _, blocks = _decoder_layers(_base_model(model))
    except NotSwiGLUError:
        return []
    return [(i, b.routing) for i, b in enumerate(blocks) if isinstance(getattr(b, "routing", None), BlockRouters)]


def routing_spec(model: nn.Module) -> RoutingSpec | None:
    """The spec of the routers installed on ``model``, or None."""
    routed = routers_of(model)
    return routed[0][1].spec if routed else None


def _unit_params(block: nn.Module, units: Sequence[str]) -> dict[str, int]:
    parts = {"block": _BLOCK_PARTS, "attn": ("self_attn", "input_layernorm"),
             "mlp": ("mlp", "post_attention_layernorm")}
    return {u: sum(count_parameters(getattr(block, p)) for p in parts[u]) for u in units}


def _check_model(model: nn.Module, blocks: nn.ModuleList) -> None:
    if len(blocks) < 2:
        raise ValueError(f"routers need at least 2 decoder blocks (block 0 is never routed); the model has "
                         f"{len(blocks)}")
    implementation = _implementation(blocks[0])
    if implementation not in _ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"routed blocks mask the attention of skipped tokens, which needs `attn_implementation` in "
                         f"{_ATTENTION_IMPLEMENTATIONS}; the model uses {implementation!r}")
    windowed = [i for i, b in enumerate(blocks) if getattr(b.self_attn, "sliding_window", None)]
    if windowed:
        raise ValueError(f"routers do not support sliding-window attention (blocks {windowed} use it)")
    current = routing_spec(model)
    if current is not None:
        raise ValueError(f"the model already has routers ({current.label}); install routers once")


def install_routers(model: nn.Module, spec: RoutingSpec) -> list[BlockRouters]:
    """Give every decoder block but the first routers of ``spec`` (in place), and return them.

    Each routed block gets a ``routing`` submodule and a routed ``forward`` (see the module docstring); the
    decoder stack gets a pre-hook that hands the padding mask to the routers; the router keys join the model's
    ``_keys_to_ignore_on_save`` so ``save_pretrained`` writes the base architecture only. Install before peft
    wraps the model, and call :func:`enable_router_training` after.

    Args:
        model: A Hugging Face causal LM (Qwen2, Llama, Mistral ...), possibly under peft.
        spec: The routers to install.

    Returns:
        The routers of blocks 1..L-1, in order.

    Raises:
        ValueError: If the model has no decoder blocks with attention, MLP and their norms, fewer than 2 blocks,
            an attention implementation other than eager / sdpa, sliding-window attention, or routers already.
    """
    base = _base_model(model)
    name, blocks = _blocks(model)
    _check_model(model, blocks)
    weight = next(blocks[0].parameters())
    hidden_size = base.config.hidden_size
    installed = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for index in range(1, len(blocks)):
            block = blocks[index]
            routing = BlockRouters(spec, hidden_size, _unit_params(block, _UNITS[spec.kind]))
            block.routing = routing.to(device=weight.device, dtype=weight.dtype)
            block.forward = functools.partial(_routed_forward, block)
            installed.append(routing)
    owner = base.get_submodule(name.rpartition(".")[0]) if "." in name else base
    owner.register_forward_pre_hook(functools.partial(_record_token_mask, installed), with_kwargs=True)
    ignored = {f"{name}.{index}.routing.{key}" for index in range(1, len(blocks))
               for key in blocks[index].routing.state_dict()}
    base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) | ignored
    log.info("installed %s routers on blocks 1-%d of %d", spec.label, len(blocks) - 1, len(blocks))
    return installed


def enable_router_training(model: nn.Module) -> None:
    """Make the routers of ``model`` trainable again (peft's wrapping freezes everything but its adapters).

    A model without routers is left as it is.
    """
    for _, routing in routers_of(model):
        routing.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------- training
def routing_penalty(model: nn.Module) -> torch.Tensor | None:
    """The routers' term of the training loss for the last training forward(s), consumed (each term counts once).

    ``mod``: ``penalty_weight * mean_u BCE_u`` (MoD Sec. 3.5, auxiliary loss). ``dllm`` / ``skip_mlp_attn``:
    ``penalty_weight * (sum_u p_u s_u / sum_u p_u - ratio)^2``, ``s_u`` the mean skip probability of unit ``u`` over
    the valid tokens and ``p_u`` its parameter count (D-LLM's execution-rate target, in our squared-gap form; the
    parameter weights matter only for ``skip_mlp_attn``, whose units differ in size).

    Args:
        model: A model with or without routers (possibly under peft).

    Returns:
        A scalar tensor, or None if the model has no routers or no training forward left a term.
    """
    routed = routers_of(model)
    terms = [(routing.unit_params[unit], router.last_term) for _, routing in routed
             for unit, router in routing.routers.items() if router.last_term is not None]
    for _, routing in routed:
        for router in routing.routers.values():
            router.last_term = None
    if not terms:
        return None
    spec = routed[0][1].spec
    if spec.kind == "mod":
        return spec.penalty_weight * torch.stack([t for _, t in terms]).mean()
    weights = torch.tensor([p for p, _ in terms], dtype=terms[0][1].dtype, device=terms[0][1].device)
    skip = (weights * torch.stack([t for _, t in terms])).sum() / weights.sum()
    return spec.penalty_weight * (skip - spec.ratio) ** 2


def skip_rates(model: nn.Module) -> dict[str, float]:
    """Fraction of valid tokens that skipped each routed unit since the last :func:`reset_skip_counters`.

    Returns:
        ``{"<block>": rate}`` for ``mod`` / ``dllm``, ``{"<block>.attn": rate, "<block>.mlp": rate}`` for
        ``skip_mlp_attn``; NaN for a unit that has seen no token.
    """
    rates = {}
    for index, routing in routers_of(model):
        for unit, router in routing.routers.items():
            seen = int(router.seen_tokens)
            key = str(index) if unit == "block" else f"{index}.{unit}"
            rates[key] = int(router.skipped_tokens) / seen if seen else float("nan")
    return rates


def reset_skip_counters(model: nn.Module) -> None:
    """Zero the skip counters of every router of ``model``."""
    for _, routing in routers_of(model):
        for router in routing.routers.values():
            router.skipped_tokens.zero_()
            router.seen_tokens.zero_()


def active_param_ratio(skip_rates: Sequence[float], unit_params: Sequence[int], dense_params: int,
                       router_params: int = 0) -> float:
    """The study's ratio ``1 - (average active parameters per token) / dense`` of a routed model.

    A token that skips unit ``u`` does not use its ``p_u`` parameters; the routers run for every token. So
    ``active = dense - sum_u s_u p_u + router_params`` and the ratio is ``(sum_u s_u p_u - router_params) / dense``.

    Args:
        skip_rates: Measured skip rate of every routed unit, in [0, 1].
        unit_params: Parameters of each unit (same order and length).
        dense_params: Parameters of the dense model (without routers).
        router_params: Parameters of all routers.

    Returns:
        The ratio (negative if the routers cost more than the skipping saves).

    Raises:
        ValueError: For lists of different lengths, a rate outside [0, 1] or a non-positive ``dense_params``.
    """
    if len(skip_rates) != len(unit_params):
        raise ValueError(f"`skip_rates` and `unit_params` must have one entry per unit; got {len(skip_rates)} and "
                         f"{len(unit_params)}")
    bad = [r for r in skip_rates if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"`skip_rates` must be in [0, 1]; got {bad}")
    if dense_params <= 0:
        raise ValueError(f"`dense_params` must be > 0; got {dense_params}")
    return (sum(r * p for r, p in zip(skip_rates, unit_params)) - router_params) / dense_params


def routed_param_ratio(model: nn.Module) -> float:
    """:func:`active_param_ratio` of ``model`` from its skip counters (units that saw no token count as 0)."""
    routed = routers_of(model)
    rates, params, router_params = [], [], 0
    for _, routing in routed:
        router_params += count_parameters(routing)
        for unit, router in routing.routers.items():
            seen = int(router.seen_tokens)
            rates.append(int(router.skipped_tokens) / seen if seen else 0.0)
            params.append(routing.unit_params[unit])
    dense = count_parameters(_base_model(model)) - router_params
    return active_param_ratio(rates, params, dense, router_params)


# ---------------------------------------------------------------------------------------------------- files
def _fingerprint(model: nn.Module) -> dict:
    """What routers must match: the base architecture's type, block count and width."""
    config = _base_model(model).config
    return {"model_type": config.model_type, "num_hidden_layers": len(_blocks(model)[1]),
            "hidden_size": config.hidden_size}


def save_routers(model: nn.Module, folder: str | Path) -> dict:
    """Write the routers of ``model`` to ``folder/routers.safetensors`` and their settings to ``routing.json``.

    The base weights are the model's ``save_pretrained`` checkpoint (which leaves the routers out).

    Args:
        model: A model with routers (possibly under peft).
        folder: An existing folder (e.g. the temporary export folder).

    Returns:
        The contents of ``routing.json``: spec, routed blocks, fingerprint, measured skip rates and active-parameter
        ratio since the last counter reset.

    Raises:
        ValueError: If the model has no routers.
    """
    from safetensors.torch import save

    routed = routers_of(model)
    if not routed:
        raise ValueError("the model has no routers to save")
    folder = Path(folder)
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous() for index, routing in routed
               for key, value in routing.state_dict().items()}
    data = {"format_version": _FORMAT_VERSION, **routed[0][1].spec.to_dict(),
            "blocks": [{"index": i, "units": list(r.routers), "unit_params": r.unit_params} for i, r in routed],
            "architecture": _fingerprint(model), "skip_rates": skip_rates(model),
            "active_param_ratio": routed_param_ratio(model)}
    atomic_write_bytes(folder / ROUTERS_FILENAME, save(tensors))
    atomic_write_text(folder / ROUTING_FILENAME, json.dumps(data, indent=1))
    return data


def load_routers(model: nn.Module, folder: str | Path) -> nn.Module:
    """Install the routers saved in ``folder`` on ``model`` (the base model they were trained on) and return it.

    Args:
        model: A Hugging Face causal LM without routers.
        folder: A folder with ``routing.json`` and ``routers.safetensors`` (:func:`save_routers`).

    Returns:
        ``model``, routed, in eval mode.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If the routers were trained for another architecture (model type, block count or hidden size).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    settings_file = folder / ROUTING_FILENAME
    data = json.loads(settings_file.read_text(encoding="utf-8"))
    expected, found = data.get("architecture", {}), _fingerprint(model)
    differ = {k: (expected.get(k), found[k]) for k in found if expected.get(k) != found[k]}
    if differ:
        detail = ", ".join(f"{k} {want!r} (the model has {got!r})" for k, (want, got) in differ.items())
        raise ValueError(f"{str(settings_file)!r} holds routers trained for another model: they expect {detail}; "
                         "load them onto the base model they were trained with")
    install_routers(model, RoutingSpec.from_dict(data))
    tensors = load_file(folder / ROUTERS_FILENAME)
    for index, routing in routers_of(model):
        prefix = f"{index}."
        routing.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model.eval()


def load_routed(folder: str | Path, **from_pretrained_kwargs) -> nn.Module:
    """Load a routed model: the base checkpoint in ``folder`` (``AutoModelForCausalLM.from_pretrained``) with the
    routers saved beside it (:func:`load_routers`).

    Args:
        folder: A folder written by ``save_pretrained`` plus :func:`save_routers` (e.g. a lit_prune export of a run
            with ``DynamicDepthCallback``).
        **from_pretrained_kwargs: Passed to ``from_pretrained`` (``dtype``, ``attn_implementation``, ...).

    Returns:
        The routed model, in eval mode.

    Raises:
        FileNotFoundError: If ``folder`` lacks ``routing.json`` or ``routers.safetensors``.
        ValueError: See :func:`load_routers`.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    missing = [f for f in (ROUTING_FILENAME, ROUTERS_FILENAME) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} has no {missing}: it is not a routed export (see save_routers)")
    return load_routers(AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs), folder)
