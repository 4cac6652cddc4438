"""PrunePlan: which neurons every layer keeps, as plain data, and the rule that sizes it.

The kept width is the same in every layer and a multiple of ``multiple_of``::

    kept_width = floor((1 - ratio) * d_ff / multiple_of) * multiple_of

which reproduces the exact ratios of the paper's Table 2 (e.g. Qwen2.5-1.5B, d_ff 8,960, 25% nominal ->
6,656 kept -> 25.71% exact). Selection is an exact top-k of the scores per layer; kept indices stay in the
original neuron order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_prune.pruning.importance import CRITERIA, compute_scores
from lit_prune.pruning.stats import NeuronStats
from lit_prune.pruning.swiglu import find_swiglu_mlps, slice_model

__all__ = ["CHECKPOINT_KEY", "PLAN_FILENAME", "PrunePlan", "kept_width", "make_plan", "validate_ratio"]

log = logging.getLogger(__name__)

PLAN_FILENAME = "prune_plan.json"
# Top-level key of Lightning checkpoints that carries the plan, so a resumed run rebuilds the shapes first.
CHECKPOINT_KEY = "lit_prune"


def validate_ratio(ratio: float) -> float:
    """Return ``ratio`` as float if it lies in (0, 1).

    Raises:
        ValueError: Otherwise.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"`ratio` (fraction of MLP neurons to remove) must be in (0, 1); got {ratio!r}")
    return float(ratio)


def kept_width(width: int, ratio: float, multiple_of: int = 128) -> int:
    """Neurons kept per layer: ``floor((1 - ratio) * width / multiple_of) * multiple_of``.

    Args:
        width: Original intermediate width ``d_ff``.
        ratio: Nominal fraction of neurons to remove, in (0, 1).
        multiple_of: Alignment of the kept width (128 as in the paper; 1 turns alignment off).

    Raises:
        ValueError: If ``ratio`` is outside (0, 1), ``multiple_of`` is < 1 or > ``width``, or the kept width
            rounds to 0 or to ``width`` (nothing would be pruned).
    """
    ratio = validate_ratio(ratio)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or not 1 <= multiple_of <= width:
        raise ValueError(f"`multiple_of` must be an integer in [1, d_ff={width}]; got {multiple_of!r}")
    # The epsilon keeps e.g. (1 - 0.2) * 8960 / 128 = 55.99999... from flooring to 55.
    kept = math.floor((1.0 - ratio) * width / multiple_of + 1e-9) * multiple_of
    if kept <= 0:
        raise ValueError(
            f"`ratio`={ratio} with `multiple_of`={multiple_of} keeps 0 of {width} neurons; lower the ratio or "
            "`multiple_of`"
        )
    if kept >= width:
        raise ValueError(
            f"`ratio`={ratio} with `multiple_of`={multiple_of} keeps all {width} neurons (the kept width rounds "
            f"up to d_ff); raise the ratio above {multiple_of / width:.4f} or lower `multiple_of`"
        )
    return kept


@dataclass
class PrunePlan:
    """Kept neuron indices of every decoder MLP and how they were chosen.

    Attributes:
        kept_indices: One strictly increasing list of kept neuron indices per layer.
        original_width: ``d_ff`` before pruning.
        mode: The criterion (``selective``, ``reverse``, ``random``, ``target_mean``).
        ratio: Nominal pruning ratio.
        multiple_of: Alignment of the kept width.
        seed: Seed used by ``random``.
        aggregation: How activations were aggregated (``prompt`` or ``token``).
        provenance: Model name, prompt counts and hashes, library versions.
    """

    kept_indices: list[list[int]]
    original_width: int
    mode: str
    ratio: float
    multiple_of: int = 128
    seed: int = 42
    aggregation: str = "prompt"
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kept_indices:
            raise ValueError("`kept_indices` must hold one index list per layer; got none")
        widths = {len(k) for k in self.kept_indices}
        if len(widths) != 1:
            raise ValueError(f"every layer must keep the same number of neurons; got {sorted(widths)}")

    @property
    def num_layers(self) -> int:
        return len(self.kept_indices)

    @property
    def kept_width(self) -> int:
        return len(self.kept_indices[0])

    @property
    def exact_ratio(self) -> float:
        """Fraction of neurons actually removed (the paper's Table 2 "exact")."""
        return 1.0 - self.kept_width / self.original_width

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(kept_width=self.kept_width, exact_ratio=self.exact_ratio, format_version=1)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        """Rebuild a plan from :meth:`to_dict` output (derived keys are ignored)."""
        required = ("kept_indices", "original_width", "mode", "ratio")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"prune plan lacks keys {missing}")
        return cls(
            kept_indices=[list(map(int, k)) for k in data["kept_indices"]],
            original_width=int(data["original_width"]),
            mode=str(data["mode"]),
            ratio=float(data["ratio"]),
            multiple_of=int(data.get("multiple_of", 128)),
            seed=int(data.get("seed", 42)),
            aggregation=str(data.get("aggregation", "prompt")),
            provenance=dict(data.get("provenance", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically; a folder gets ``prune_plan.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(self.to_dict(), handle, indent=1)
        os.replace(handle.name, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"prune plan {str(path)!r} does not exist")
        return cls.from_dict(json.loads(path.read_text()))

    def check_model(self, model: nn.Module) -> None:
        """Raise unless ``model`` is the dense model this plan was made for.

        Raises:
            ValueError: Naming both shapes, if the number of layers or the MLP width differ.
        """
        blocks = find_swiglu_mlps(model)
        if len(blocks) != self.num_layers or blocks[0].width != self.original_width:
            name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
            raise ValueError(
                f"prune plan for {self.provenance.get('model', 'a model')!r} with {self.num_layers} layers x "
                f"d_ff {self.original_width} does not fit model {name!r} with {len(blocks)} layers x d_ff "
                f"{blocks[0].width}"
            )

    def is_applied(self, model: nn.Module) -> bool:
        """True if ``model``'s MLPs already have this plan's kept width in every layer."""
        blocks = find_swiglu_mlps(model)
        return len(blocks) == self.num_layers and all(b.width == self.kept_width for b in blocks)

    def apply(self, model: nn.Module) -> nn.Module:
        """Slice ``model`` in place to this plan and return it.

        Raises:
            ValueError: If the model does not have the plan's original shapes.
        """
        self.check_model(model)
        slice_model(model, self.kept_indices)
        return model


def make_plan(
    stats: NeuronStats,
    ratio: float,
    mode: str = "selective",
    multiple_of: int = 128,
    seed: int = 42,
    provenance: dict | None = None,
) -> PrunePlan:
    """Score every neuron with criterion ``mode`` and keep the top ``kept_width`` per layer.

    Raises:
        ValueError: For a bad ``ratio``, ``multiple_of`` or ``mode``, or an empty target/distractor set.
    """
    if mode not in CRITERIA:
        raise ValueError(f"`mode` must be one of {CRITERIA}; got {mode!r}")
    width = kept_width(stats.width, ratio, multiple_of)
    scores = compute_scores(stats, mode, seed)
    kept = torch.topk(scores, width, dim=1, sorted=False).indices.sort(dim=1).values
    info = dict(stats.metadata)
    info.update(provenance or {})
    info.setdefault("target_samples", int(stats.target_count))
    info.setdefault("distractor_samples", int(stats.distractor_count))
    return PrunePlan(kept.tolist(), stats.width, mode, float(ratio), multiple_of, seed, stats.aggregation, info)
