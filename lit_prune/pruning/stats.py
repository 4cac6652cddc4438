"""Streaming per-neuron activation statistics of SwiGLU MLPs (the paper's Eq. 7-8 without the N x L x d_ff tensor).

The paper stores one masked-mean vector ``mean_t |h_t|`` per prompt and layer and computes the
selectivity from that tensor. The selectivity only needs, per neuron, the number of samples and the
sum of the samples in each group (target, distractor) and the sum of squares over all samples. These
are accumulated here in float64 as prompts stream through the model, so memory is O(layers x d_ff)
whatever the number of prompts, and statistics of several ranks or runs merge by addition.

``h`` is the input of ``down_proj`` (``act(gate_proj(x)) * up_proj(x)``), read by a forward pre-hook;
gate and up are never recomputed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_prune.pruning.swiglu import find_swiglu_mlps

__all__ = [
    "AGGREGATIONS",
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
# Largest float32 copy of |h| a capture hook makes at once (64 MiB): longer batches are summed in slices of
# the sequence. At Qwen2.5-7B shapes (d_ff 18,944), 8 x 512 tokens would otherwise copy 310 MB per layer.
HOOK_CHUNK_ELEMENTS = 2**24
_STATE_KEYS = ("target_count", "distractor_count", "target_sum", "distractor_sum", "sum_squares")


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


@dataclass
class NeuronStats:
    """Sufficient statistics of ``|h|`` per layer and neuron.

    Attributes:
        target_count: Samples seen in the target group (prompts, or tokens with ``aggregation="token"``).
        distractor_count: Samples seen in the distractor group.
        target_sum: ``(L, d_ff)`` float64 sum of the target samples.
        distractor_sum: ``(L, d_ff)`` float64 sum of the distractor samples.
        sum_squares: ``(L, d_ff)`` float64 sum of squared samples over both groups.
        aggregation: ``"prompt"`` (the paper: one masked mean per prompt) or ``"token"`` (every valid token).
        metadata: Free provenance (model name, prompt hashes, ...), saved with the statistics.
    """

    target_count: torch.Tensor
    distractor_count: torch.Tensor
    target_sum: torch.Tensor
    distractor_sum: torch.Tensor
    sum_squares: torch.Tensor
    aggregation: str = "prompt"
    metadata: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_layers: int, width: int, aggregation: str = "prompt", device=None) -> NeuronStats:
        """Empty statistics for ``num_layers`` layers of ``width`` neurons.

        Raises:
            ValueError: If ``aggregation`` is not one of ``AGGREGATIONS``.
        """
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}; got {aggregation!r}")

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(zeros(()), zeros(()), zeros(num_layers, width), zeros(num_layers, width), zeros(num_layers, width),
                   aggregation=aggregation)

    @property
    def num_layers(self) -> int:
        return self.target_sum.shape[0]

    @property
    def width(self) -> int:
        return self.target_sum.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.width)

    def to(self, device) -> NeuronStats:
        return NeuronStats(*(getattr(self, k).to(device) for k in _STATE_KEYS), aggregation=self.aggregation,
                           metadata=dict(self.metadata))

    def merge_(self, other: NeuronStats) -> NeuronStats:
        """Add ``other`` into ``self`` (statistics of disjoint prompt sets merge by addition)."""
        if other.shape != self.shape or other.aggregation != self.aggregation:
            raise ValueError(
                f"cannot merge statistics of shape {other.shape} ({other.aggregation}) into {self.shape} "
                f"({self.aggregation})"
            )
        for key in _STATE_KEYS:
            getattr(self, key).add_(getattr(other, key).to(getattr(self, key).device))
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The state tensors, in a fixed order (for an all-reduce)."""
        return [getattr(self, k) for k in _STATE_KEYS]

    def group_mean(self, group: str) -> torch.Tensor:
        """``mu_group`` per layer and neuron.

        Raises:
            ValueError: If the group is unknown or has no samples.
        """
        if group not in GROUPS:
            raise ValueError(f"`group` must be one of {GROUPS}; got {group!r}")
        count = getattr(self, f"{group}_count")
        if float(count) <= 0:
            raise ValueError(f"the {group} set is empty: no {group} samples were captured")
        return getattr(self, f"{group}_sum") / count

    def pooled_std(self) -> torch.Tensor:
        """Unbiased standard deviation of every neuron over all samples of both groups."""
        total = self.target_count + self.distractor_count
        if float(total) < 2:
            raise ValueError(f"the standard deviation needs at least 2 samples; got {int(total)}")
        total_sum = self.target_sum + self.distractor_sum
        variance = (self.sum_squares - total_sum * total_sum / total) / (total - 1)
        return variance.clamp_min(0.0).sqrt()

    def check_finite(self) -> None:
        """Raise if any layer's statistics are NaN or infinite, naming the layers."""
        bad = [i for i in range(self.num_layers)
               if not all(bool(torch.isfinite(getattr(self, k)[i]).all()) for k in _STATE_KEYS[2:])]
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

    def state_dict(self) -> dict:
        state = {k: getattr(self, k).detach().cpu() for k in _STATE_KEYS}
        state.update(aggregation=self.aggregation, metadata=dict(self.metadata), format_version=1)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> NeuronStats:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"statistics state lacks keys {missing}")
        return cls(*(state[k].to(torch.float64) for k in _STATE_KEYS), aggregation=state.get("aggregation", "prompt"),
                   metadata=dict(state.get("metadata", {})))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            tmp = Path(handle.name)
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronStats:
        """Read statistics written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class ActivationRecorder:
    """Forward pre-hooks on every ``down_proj`` that stream ``|h|`` into :class:`NeuronStats`.

    Usage::

        recorder = ActivationRecorder(model)
        with recorder.recording():
            for batch, group in batches:
                recorder.observe(model, batch["input_ids"], batch["attention_mask"], group)
        stats = recorder.stats

    The hooks do no host synchronisation (no ``.item()``): masked sums are reduced on the device in
    float32 per batch, accumulated in float64, and checked for non-finite values once at the end.
    """

    def __init__(self, model: nn.Module, aggregation: str = "prompt", stats: NeuronStats | None = None) -> None:
        """
        Args:
            model: The causal LM to record.
            aggregation: ``"prompt"`` (the paper) or ``"token"``.
            stats: Statistics to add into (a fresh set when None).

        Raises:
            ValueError: If ``aggregation`` is unknown or ``stats`` does not fit the model.
            NotSwiGLUError: If the model has no SwiGLU MLPs.
        """
        self.blocks = find_swiglu_mlps(model)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}; got {aggregation!r}")
        device = self.blocks[0].down_proj.weight.device
        if stats is None:
            stats = NeuronStats.zeros(len(self.blocks), self.blocks[0].width, aggregation, device=device)
        else:
            stats.check_compatible(model)
            if stats.aggregation != aggregation:
                raise ValueError(f"`stats` were aggregated per {stats.aggregation}, not per {aggregation}")
            stats = stats.to(device)
        self.stats = stats
        self.aggregation = aggregation
        self.skipped_prompts = 0
        self._mask: torch.Tensor | None = None
        self._forward_kwargs: dict = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            # Capture never reads the logits: the LM head over every position is the largest temporary
            # (2.3 GiB at 8 x 512 tokens and Qwen's 152k vocabulary) and 1/4 of the forward time at 0.5B.
            self._forward_kwargs["logits_to_keep"] = 1
        self._group: str | None = None

    def _hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._mask is None:
                return  # a forward outside observe(): not part of the capture
            h = args[0]
            mask = self._mask.to(device=h.device, dtype=torch.float32)
            stats = self.stats
            summed, squared = self._masked_sums(h.detach(), mask, squares=self.aggregation == "token")
            if self.aggregation == "prompt":
                tokens = mask.sum(dim=1, keepdim=True)
                samples = (summed / tokens).double()  # observe() never passes an empty prompt
                sample_sum, sample_squares = samples.sum(0), (samples * samples).sum(0)
            else:
                sample_sum, sample_squares = summed.double().sum(0), squared.double().sum(0)
            getattr(stats, f"{self._group}_sum")[layer_index].add_(sample_sum.to(stats.target_sum.device))
            stats.sum_squares[layer_index].add_(sample_squares.to(stats.sum_squares.device))

        return hook

    @staticmethod
    def _masked_sums(h: torch.Tensor, mask: torch.Tensor, squares: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-prompt masked sums over tokens of ``|h|`` (and of ``|h|**2``), shape (B, d_ff), float32.

        ``(B, 1, t) @ (B, t, d_ff)`` batched matmuls over slices of the sequence, so the float32 copy of
        ``|h|`` never exceeds :data:`HOOK_CHUNK_ELEMENTS` (one slice when the batch is small).
        """
        batch, length, width = h.shape
        step = max(1, min(length, HOOK_CHUNK_ELEMENTS // max(1, batch * width)))
        summed = h.new_zeros(batch, width, dtype=torch.float32)
        squared = h.new_zeros(batch, width, dtype=torch.float32) if squares else None
        for start in range(0, length, step):
            abs_h = h[:, start:start + step].abs().float()
            weights = mask[:, None, start:start + step]
            summed += torch.bmm(weights, abs_h).squeeze(1)
            if squares:
                squared += torch.bmm(weights, abs_h * abs_h).squeeze(1)
        return summed, squared

    @contextmanager
    def recording(self) -> Iterator[ActivationRecorder]:
        """Register the hooks for the duration of the block; they are removed even on error."""
        handles = [b.down_proj.register_forward_pre_hook(self._hook(b.layer_index)) for b in self.blocks]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None

    @torch.no_grad()
    def observe(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: str) -> None:
        """Run one batch of ``group`` prompts through ``model`` and accumulate its statistics.

        Prompts whose attention mask is all zeros are skipped with a warning.

        Raises:
            ValueError: If ``group`` is unknown or the shapes of ``input_ids`` and ``attention_mask`` differ.
        """
        if group not in GROUPS:
            raise ValueError(f"`group` must be one of {GROUPS}; got {group!r}")
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"`input_ids` {tuple(input_ids.shape)} and `attention_mask` "
                             f"{tuple(attention_mask.shape)} must have the same shape")
        tokens = attention_mask.sum(dim=1)
        empty = int((tokens == 0).sum())
        if empty:
            self.skipped_prompts += empty
            warnings.warn(f"skipped {empty} {group} prompt(s) whose attention mask is all zeros", stacklevel=2)
        if empty == len(tokens):
            return
        if empty:  # drop them before the forward: a fully masked row can turn attention into NaN
            keep = tokens > 0
            input_ids, attention_mask, tokens = input_ids[keep], attention_mask[keep], tokens[keep]
        count = tokens.sum() if self.aggregation == "token" else (tokens > 0).sum()
        getattr(self.stats, f"{group}_count").add_(count.to(self.stats.target_count.device, torch.float64))
        self._mask, self._group = attention_mask, group
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, **self._forward_kwargs)
        finally:
            self._mask, self._group = None, None

    def finalize(self) -> NeuronStats:
        """Check the statistics for non-finite values and return them (on the capture device)."""
        self.stats.check_finite()
        return self.stats


