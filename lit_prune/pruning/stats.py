"""Streaming per-neuron statistics of SwiGLU MLPs: everything every width criterion needs, in one pass.

``h`` is the input of ``down_proj`` (``act(gate_proj(x)) * up_proj(x)``), read by a forward pre-hook; gate
and up are never recomputed. The paper keeps one masked-mean vector per prompt and layer (an N x L x d_ff
tensor); every criterion here needs only sums over tokens or prompts, so memory is O(layers x d_ff) whatever
the number of prompts, and statistics of several ranks or runs merge by addition.

Per group (``target``, ``distractor``) and per layer and neuron, over the valid (non-padding) tokens:

===========================  ============================================================  =================
key                          value                                                          used by
===========================  ============================================================  =================
``<g>.tokens``               number of valid tokens                                         token means
``<g>.prompts``              number of prompts                                              prompt means
``<g>.abs_sum``              sum over tokens of ``|h|``                                     selective/token
``<g>.sum``                  sum over tokens of ``h``                                       flap (variance)
``<g>.sq_sum``               sum over tokens of ``h**2``                                    wanda_sp, flap
``<g>.prompt_mean_sum``      sum over prompts of each prompt's mean ``|h|``                 selective (paper)
``<g>.prompt_mean_sq_sum``   sum over prompts of the square of that mean                    selective, minitron
===========================  ============================================================  =================

Optional, switched on only when a criterion needs them (the capture costs more):

* ``target.gram``: ``(L, d_ff, d_ff)`` sum over target tokens of ``h h^T`` (``gram=True``). It costs
  ``L * d_ff**2 * 8`` bytes in float64: 4 x 1,024 (the toy) 34 MB, 30 x 1,536 (SmolLM2-135M) 0.57 GB,
  28 x 8,960 (Qwen2.5-1.5B) 18.0 GB, 28 x 18,944 (Qwen2.5-7B) 80.4 GB. Bound it with ``gram_layers`` (capture
  the Gram of a subset of layers per pass; :func:`lit_prune.pruning.engine.make_plan` needs every layer's, so a
  GPU user with little memory runs capture once per layer chunk, or keeps float64 on the host).
* ``target.grad_sum`` / ``target.grad_sq_sum`` / ``target.grad_prompts``: from a backward pass on target
  texts with frozen weights, the per-neuron sum over tokens of ``h * dL/dh`` and the sum over prompts of the
  square of each prompt's sum (a Fisher form) (``gradients=True``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lit_prune.io import atomic_open
from lit_prune.pruning.swiglu import find_swiglu_mlps

__all__ = [
    "AGGREGATIONS",
    "FORMAT_VERSION",
    "GROUPS",
    "HOOK_CHUNK_ELEMENTS",
    "ActivationRecorder",
    "NeuronStats",
    "model_fingerprint",
    "prompt_set_hash",
]

log = logging.getLogger(__name__)

GROUPS = ("target", "distractor")
AGGREGATIONS = ("prompt", "token")
FORMAT_VERSION = 2
# Largest float32 copy of h a capture hook makes at once (64 MiB): longer batches are reduced in slices of the
# sequence. At Qwen2.5-7B shapes (d_ff 18,944), 8 x 512 tokens would otherwise copy 310 MB per layer.
HOOK_CHUNK_ELEMENTS = 2**24
_COUNTS = ("tokens", "prompts")
_FORWARD = ("abs_sum", "sum", "sq_sum", "prompt_mean_sum", "prompt_mean_sq_sum")
_GRADIENTS = ("target.grad_sum", "target.grad_sq_sum", "target.grad_prompts")


def prompt_set_hash(prompts: Iterable[str]) -> str:
    """SHA-256 of a list of prompts (order matters), for provenance."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


@torch.no_grad()
def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """SHA-256 over every floating tensor's name, shape, dtype and the exact bytes of evenly spaced elements.

    A path such as ``checkpoints/toy-math`` names a folder, not weights: retraining or re-exporting into
    the same folder must not reuse statistics or reference outputs of the old weights. Up to
    ``samples_per_tensor`` elements of each tensor are read (no reduction, so the same weights give the same
    string on any device and thread count); training changes nearly every element, so they change it.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].float().cpu()  # float32 holds bf16/fp16 values exactly
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


class StatsFileError(ValueError):
    """A statistics file that cannot be read (truncated, empty, another format): capture again."""


@dataclass
class NeuronStats:
    """Sufficient statistics of ``h`` per layer and neuron (see the module docstring for the keys).

    Attributes:
        state: Tensors by key (``"target.abs_sum"``, ...): scalars for counts, ``(L, d_ff)`` sums, an optional
            ``(L, d_ff, d_ff)`` target Gram matrix; float64.
        metadata: Free provenance (model name and fingerprint, prompt hashes, capture settings), saved with the
            statistics.
    """

    state: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_layers: int, width: int, gram: bool = False, gradients: bool = False,
              device=None, gram_device=None) -> NeuronStats:
        """Empty statistics for ``num_layers`` layers of ``width`` neurons (optionally with Gram / gradients; the
        Gram matrix on ``gram_device``, default ``device``)."""

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        state = {}
        for group in GROUPS:
            state.update({f"{group}.{k}": zeros(()) for k in _COUNTS})
            state.update({f"{group}.{k}": zeros(num_layers, width) for k in _FORWARD})
        if gram:
            state["target.gram"] = torch.zeros(num_layers, width, width, dtype=torch.float64,
                                               device=gram_device if gram_device is not None else device)
        if gradients:
            state.update({"target.grad_sum": zeros(num_layers, width), "target.grad_sq_sum": zeros(num_layers, width),
                          "target.grad_prompts": zeros(())})
        return cls(state)

    # ------------------------------------------------------------------ shape and contents
    @property
    def num_layers(self) -> int:
        return self.state["target.abs_sum"].shape[0]

    @property
    def width(self) -> int:
        return self.state["target.abs_sum"].shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.width)

    @property
    def has_gram(self) -> bool:
        return "target.gram" in self.state

    @property
    def has_gradients(self) -> bool:
        return "target.grad_sum" in self.state

    @property
    def statistics(self) -> frozenset[str]:
        """Which optional statistics these hold: a subset of ``{"gram", "gradients"}``."""
        return frozenset(name for name, present in (("gram", self.has_gram), ("gradients", self.has_gradients))
                         if present)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self.state[key]
        except KeyError:
            raise KeyError(f"statistics hold no {key!r}; they hold {sorted(self.state)}") from None

    def to(self, device) -> NeuronStats:
        return NeuronStats({k: v.to(device) for k, v in self.state.items()}, dict(self.metadata))

    def merge_(self, other: NeuronStats) -> NeuronStats:
        """Add ``other`` into ``self`` (statistics of disjoint prompt sets merge by addition).

        Raises:
            ValueError: If the shapes or the sets of statistics differ.
        """
        if other.shape != self.shape or set(other.state) != set(self.state):
            raise ValueError(f"cannot merge statistics of shape {other.shape} with {sorted(other.statistics)} into "
                             f"{self.shape} with {sorted(self.statistics)}")
        for key, tensor in self.state.items():
            tensor.add_(other.state[key].to(tensor.device))
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The state tensors in a fixed (sorted-key) order, for an all-reduce."""
        return [self.state[k] for k in sorted(self.state)]

    # ------------------------------------------------------------------ derived quantities
    def count(self, group: str, aggregation: str = "prompt") -> torch.Tensor:
        """Samples of ``group``: prompts (``aggregation="prompt"``) or valid tokens (``"token"``)."""
        _check_group(group)
        _check_aggregation(aggregation)
        return self.state[f"{group}.{'prompts' if aggregation == 'prompt' else 'tokens'}"]

    def _samples(self, group: str, aggregation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, sum, sum of squares) of the samples of ``|h|``: per-prompt means or per-token values."""
        count = self.count(group, aggregation)
        if aggregation == "prompt":
            return count, self.state[f"{group}.prompt_mean_sum"], self.state[f"{group}.prompt_mean_sq_sum"]
        return count, self.state[f"{group}.abs_sum"], self.state[f"{group}.sq_sum"]

    def group_mean(self, group: str, aggregation: str = "prompt") -> torch.Tensor:
        """``mu_group``: mean of ``|h|`` over the group's prompts (their masked means) or its tokens.

        Raises:
            ValueError: If the group is unknown or has no samples.
        """
        count, total, _ = self._samples(group, aggregation)
        if float(count) <= 0:
            raise ValueError(f"the {group} set is empty: no {group} samples were captured")
        return total / count

    def pooled_std(self, aggregation: str = "prompt") -> torch.Tensor:
        """Unbiased standard deviation of ``|h|`` samples of every neuron over both groups pooled."""
        counts, sums, squares = zip(*(self._samples(g, aggregation) for g in GROUPS))
        total, total_sum, total_squares = sum(counts), sum(sums), sum(squares)
        if float(total) < 2:
            raise ValueError(f"the standard deviation needs at least 2 samples; got {int(total)}")
        variance = (total_squares - total_sum * total_sum / total) / (total - 1)
        return variance.clamp_min(0.0).sqrt()

    def token_mean_square(self, group: str = "target") -> torch.Tensor:
        """Mean over the group's tokens of ``h**2`` (Wanda-sp's squared input norm per token)."""
        tokens = self.count(group, "token")
        if float(tokens) <= 0:
            raise ValueError(f"the {group} set is empty: no {group} tokens were captured")
        return self.state[f"{group}.sq_sum"] / tokens

    def token_variance(self, group: str = "target") -> torch.Tensor:
        """Unbiased variance over the group's tokens of the signed ``h`` (FLAP's fluctuation)."""
        tokens = self.count(group, "token")
        if float(tokens) < 2:
            raise ValueError(f"the variance needs at least 2 {group} tokens; got {int(tokens)}")
        total = self.state[f"{group}.sum"]
        return ((self.state[f"{group}.sq_sum"] - total * total / tokens) / (tokens - 1)).clamp_min(0.0)

    def gram(self, layer: int) -> torch.Tensor:
        """``sum h h^T`` over target tokens for one layer, ``(d_ff, d_ff)``.

        Raises:
            ValueError: If the Gram matrix was not captured.
        """
        if not self.has_gram:
            raise ValueError("these statistics hold no Gram matrix; capture with `gram=True`")
        return self.state["target.gram"][layer]

    # ------------------------------------------------------------------ checks
    def check_finite(self) -> None:
        """Raise if any layer's statistics are NaN or infinite, naming the layers."""
        bad = sorted({i for key, tensor in self.state.items() if tensor.dim() >= 2
                      for i in range(self.num_layers) if not bool(torch.isfinite(tensor[i]).all())})
        if bad:
            raise FloatingPointError(
                f"non-finite MLP activations in layer(s) {bad} (down_proj input); check the model's dtype "
                "(fp16 overflow?) and weights"
            )

    def check_compatible(self, model: nn.Module) -> None:
        """Raise if these statistics were not captured on a model with ``model``'s MLP shapes."""
        blocks = find_swiglu_mlps(model)
        model_shape = (len(blocks), blocks[0].width)
        if model_shape != self.shape:
            name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
            raise ValueError(
                f"statistics of shape (layers, d_ff) = {self.shape} (from {self.metadata.get('model', 'unknown')}) "
                f"do not match model {name!r} with shape {model_shape}"
            )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"state": {k: v.detach().cpu() for k, v in self.state.items()}, "metadata": dict(self.metadata),
                "format_version": FORMAT_VERSION}

    @classmethod
    def from_state_dict(cls, data: dict) -> NeuronStats:
        """Rebuild statistics from :meth:`state_dict` output.

        Raises:
            StatsFileError: If ``data`` is of another format version or lacks keys.
        """
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else type(data).__name__
            raise StatsFileError(f"statistics of format {version!r}; this lit_prune reads format {FORMAT_VERSION}")
        state = data.get("state") or {}
        required = [f"{g}.{k}" for g in GROUPS for k in _COUNTS + _FORWARD]
        missing = [k for k in required if k not in state]
        if missing:
            raise StatsFileError(f"statistics lack keys {missing}")
        return cls({k: v.to(torch.float64) for k, v in state.items()}, dict(data.get("metadata", {})))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics atomically (:func:`lit_prune.io.atomic_open`).

        Raises:
            ValueError: If ``path`` is an existing directory.
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"statistics path {str(path)!r} is a directory; give a file name such as stats.pt")
        with atomic_open(path, "wb") as handle:
            torch.save(self.state_dict(), handle)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronStats:
        """Read statistics written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            StatsFileError: If the file is truncated, empty, not a statistics file or of another format; the
                message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls.from_state_dict(data)
        except StatsFileError as error:
            raise StatsFileError(f"statistics file {str(path)!r}: {error}") from None
        except Exception as error:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for torn files
            raise StatsFileError(f"statistics file {str(path)!r} cannot be read ({type(error).__name__}: {error}); "
                                 "it is truncated or not a lit_prune statistics file") from error


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"`group` must be one of {GROUPS}; got {group!r}")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}; got {aggregation!r}")


class ActivationRecorder:
    """Forward pre-hooks on every ``down_proj`` that stream ``h`` into :class:`NeuronStats`.

    Usage::

        recorder = ActivationRecorder(model, gram=True)
        with recorder.recording():
            for input_ids, attention_mask, group in batches:
                recorder.observe(model, input_ids, attention_mask, group)
            for input_ids, attention_mask, labels in target_batches:   # only with gradients=True
                recorder.observe_gradients(model, input_ids, attention_mask, labels)
        stats = recorder.finalize()

    The hooks do no host synchronisation (no ``.item()``): masked sums are reduced on the device in float32 per
    batch (in slices of the sequence, see :data:`HOOK_CHUNK_ELEMENTS`), accumulated in float64, and checked for
    non-finite values once at the end.
    """

    def __init__(self, model: nn.Module, gram: bool = False, gradients: bool = False,
                 gram_layers: Sequence[int] | None = None, gram_device=None, stats: NeuronStats | None = None) -> None:
        """
        Args:
            model: The causal LM to record.
            gram: Also accumulate the target Gram matrix ``sum h h^T`` of every layer (or of ``gram_layers``).
            gradients: Allow :meth:`observe_gradients` (gradient statistics from a backward pass).
            gram_layers: Layers whose Gram matrix is accumulated (default: all); the others stay zero.
            gram_device: Where the float64 Gram accumulator lives (default: the model's device). ``"cpu"`` keeps
                the ``L x d_ff^2`` matrix in host memory: each batch's float32 Gram is still computed on the device
                and copied (one transfer per layer and batch).
            stats: Statistics to add into (fresh ones when None).

        Raises:
            ValueError: If ``stats`` does not fit the model or lacks a requested statistic, or ``gram_layers``
                names a layer the model does not have.
            NotSwiGLUError: If the model has no SwiGLU MLPs.
        """
        self.blocks = find_swiglu_mlps(model)
        num_layers, width = len(self.blocks), self.blocks[0].width
        device = self.blocks[0].down_proj.weight.device
        if stats is None:
            stats = NeuronStats.zeros(num_layers, width, gram=gram, gradients=gradients, device=device,
                                      gram_device=gram_device)
        else:
            stats.check_compatible(model)
            if (gram and not stats.has_gram) or (gradients and not stats.has_gradients):
                raise ValueError("`stats` lack the Gram matrix or gradient statistics this recorder should add to")
            stats = NeuronStats({k: v if k == "target.gram" else v.to(device) for k, v in stats.state.items()},
                                stats.metadata)
        layers = range(num_layers) if gram_layers is None else list(gram_layers)
        bad = [i for i in layers if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"`gram_layers` must lie in [0, {num_layers}); got {bad}")
        self.stats = stats
        self.gram = gram
        self.gradients = gradients
        self.gram_layers = frozenset(int(i) for i in layers) if gram else frozenset()
        self.skipped_prompts = 0
        self._mask: torch.Tensor | None = None
        self._group: str | None = None
        self._stash: dict[int, torch.Tensor] | None = None
        self._forward_kwargs: dict = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            # The forward statistics never read the logits: the LM head over every position is the largest
            # temporary (2.3 GiB at 8 x 512 tokens and Qwen's 152k vocabulary) and 1/4 of the forward at 0.5B.
            self._forward_kwargs["logits_to_keep"] = 1

    def _hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._stash is not None:
                self._stash[layer_index] = args[0]  # gradient pass: keep h in the graph
            elif self._mask is not None:
                self._accumulate(layer_index, args[0].detach(), self._mask)

        return hook

    def _accumulate(self, layer: int, h: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Add one batch's masked sums of ``h`` (B, T, d_ff) for ``layer`` into the statistics."""
        state, group = self.stats.state, self._group
        batch, length, width = h.shape
        mask = attention_mask.to(device=h.device, dtype=torch.float32)
        step = max(1, min(length, HOOK_CHUNK_ELEMENTS // max(1, batch * width)))
        abs_sum = h.new_zeros(batch, width, dtype=torch.float32)
        signed_sum = h.new_zeros(batch, width, dtype=torch.float32)
        sq_sum = h.new_zeros(batch, width, dtype=torch.float32)
        gram = group == "target" and layer in self.gram_layers
        gram_sum = h.new_zeros(width, width, dtype=torch.float32) if gram else None
        for start in range(0, length, step):
            chunk = h[:, start:start + step].float()
            weights = mask[:, None, start:start + step]
            abs_sum += torch.bmm(weights, chunk.abs()).squeeze(1)
            signed_sum += torch.bmm(weights, chunk).squeeze(1)
            sq_sum += torch.bmm(weights, chunk * chunk).squeeze(1)
            if gram:
                flat = chunk.reshape(-1, width)[weights.reshape(-1) > 0]
                gram_sum.addmm_(flat.T, flat)
        tokens = mask.sum(dim=1, keepdim=True)
        # A row without a selected token (possible only with `token_mask`) adds 0 and is not counted as a prompt.
        prompt_means = (abs_sum / tokens.clamp_min(1.0)).double()
        target = state[f"{group}.abs_sum"].device
        state[f"{group}.abs_sum"][layer].add_(abs_sum.double().sum(0).to(target))
        state[f"{group}.sum"][layer].add_(signed_sum.double().sum(0).to(target))
        state[f"{group}.sq_sum"][layer].add_(sq_sum.double().sum(0).to(target))
        state[f"{group}.prompt_mean_sum"][layer].add_(prompt_means.sum(0).to(target))
        state[f"{group}.prompt_mean_sq_sum"][layer].add_((prompt_means * prompt_means).sum(0).to(target))
        if gram:
            accumulator = state["target.gram"]
            accumulator[layer].add_(gram_sum.to(accumulator.device).double())

    @contextmanager
    def recording(self) -> Iterator[ActivationRecorder]:
        """Register the hooks for the duration of the block; they are removed even on error."""
        handles = [b.down_proj.register_forward_pre_hook(self._hook(b.layer_index)) for b in self.blocks]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mask, self._group, self._stash = None, None, None

    def _drop_empty(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: str, *others):
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"`input_ids` {tuple(input_ids.shape)} and `attention_mask` "
                             f"{tuple(attention_mask.shape)} must have the same shape")
        tokens = attention_mask.sum(dim=1)
        empty = int((tokens == 0).sum())
        if empty:
            self.skipped_prompts += empty
            warnings.warn(f"skipped {empty} {group} prompt(s) whose attention mask is all zeros", stacklevel=3)
        if empty == len(tokens):
            return None
        if empty:  # drop them before the forward: a fully masked row can turn attention into NaN
            keep = tokens > 0
            return (input_ids[keep], attention_mask[keep], *(o[keep] for o in others))
        return (input_ids, attention_mask, *others)

    @torch.no_grad()
    def observe(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: str,
                token_mask: torch.Tensor | None = None) -> None:
        """Run one batch of ``group`` texts through ``model`` and accumulate the forward statistics.

        Rows whose attention mask is all zeros are skipped with a warning.

        Args:
            model: The model the hooks are on.
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 on valid tokens; the model attends to these.
            group: One of :data:`GROUPS`.
            token_mask: ``(B, T)``, 1 on the tokens whose ``h`` is accumulated (a subset of the valid tokens, for
                example the task-relevant tokens of neuron attribution); None: every valid token. The model still
                attends to every valid token. ``prompts`` counts the rows with at least one such token.

        Raises:
            ValueError: If ``group`` is unknown or the shapes of ``input_ids``, ``attention_mask`` and
                ``token_mask`` differ.
        """
        _check_group(group)
        if token_mask is not None and token_mask.shape != attention_mask.shape:
            raise ValueError(f"`token_mask` {tuple(token_mask.shape)} must have the shape of `attention_mask` "
                             f"{tuple(attention_mask.shape)}")
        kept = self._drop_empty(input_ids, attention_mask, group, *(() if token_mask is None else (token_mask,)))
        if kept is None:
            return
        input_ids, attention_mask = kept[:2]
        selected = attention_mask if token_mask is None else (kept[2] != 0) & (attention_mask != 0)
        tokens = selected.sum(dim=1)
        counts = self.stats.state
        device = counts[f"{group}.tokens"].device
        counts[f"{group}.tokens"].add_(tokens.sum().to(device, torch.float64))
        counts[f"{group}.prompts"].add_((tokens > 0).sum().to(device, torch.float64))
        self._mask, self._group = selected, group
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, **self._forward_kwargs)
        finally:
            self._mask, self._group = None, None

    def observe_gradients(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor) -> None:
        """Backward pass of the summed next-token loss on ``labels`` (``-100`` = ignored) over one target batch.

        Adds, per neuron, ``sum over valid tokens of h * dL/dh`` and the square of each prompt's sum. Weights get
        no gradient (``torch.autograd.grad`` w.r.t. ``h`` only), so frozen and trainable models alike stay as
        they are.

        Raises:
            ValueError: If the recorder was built without ``gradients=True`` or the shapes differ.
        """
        if not self.gradients:
            raise ValueError("this recorder was built without `gradients=True`")
        if labels.shape != input_ids.shape:
            raise ValueError(f"`labels` {tuple(labels.shape)} must have the shape of `input_ids` "
                             f"{tuple(input_ids.shape)}")
        kept = self._drop_empty(input_ids, attention_mask, "target", labels)
        if kept is None:
            return
        input_ids, attention_mask, labels = kept
        self._stash = {}
        try:
            with torch.enable_grad():
                embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum")
                layers = sorted(self._stash)
                grads = torch.autograd.grad(loss, [self._stash[i] for i in layers])
            mask = attention_mask.to(torch.float32)
            state = self.stats.state
            for layer, grad in zip(layers, grads):
                product = (self._stash[layer].detach().float() * grad.float())
                per_prompt = torch.bmm(mask[:, None, :].to(product.device), product).squeeze(1).double()
                device = state["target.grad_sum"].device
                state["target.grad_sum"][layer].add_(per_prompt.sum(0).to(device))
                state["target.grad_sq_sum"][layer].add_((per_prompt * per_prompt).sum(0).to(device))
            state["target.grad_prompts"].add_(float(len(input_ids)))
        finally:
            self._stash = None

    def finalize(self) -> NeuronStats:
        """Check the statistics for non-finite values and return them (on the capture device)."""
        self.stats.check_finite()
        return self.stats
