"""PrunePlan: which neurons every layer keeps, as plain data, and the rule that sizes it.

The kept width is the same in every layer and a multiple of ``multiple_of``::

    kept_width = floor((1 - ratio) * d_ff / multiple_of) * multiple_of

which reproduces the exact ratios of the paper's Table 2 (e.g. Qwen2.5-1.5B, d_ff 8,960, 25% nominal ->
6,656 kept -> 25.71% exact). Plans are made by :func:`lit_prune.pruning.engine.make_plan`; kept indices stay
in the original neuron order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from lit_prune.io import atomic_write_text
from lit_prune.pruning.swiglu import find_swiglu_mlps, slice_model

__all__ = ["CHECKPOINT_KEY", "PLAN_FILENAME", "PrunePlan", "kept_width", "read_checkpoint_plan", "validate_multiple_of",
           "validate_ratio"]

log = logging.getLogger(__name__)

PLAN_FILENAME = "prune_plan.json"
# Top-level key of Lightning checkpoints that carries the plan, so a resumed run rebuilds the shapes first. One
# writer (SelectivityPruneCallback.on_save_checkpoint) and one reader (read_checkpoint_plan).
CHECKPOINT_KEY = "lit_prune"


def read_checkpoint_plan(checkpoint: dict) -> PrunePlan | None:
    """The prune plan a Lightning checkpoint carries under ``checkpoint["lit_prune"]["plan"]``, if any."""
    data = (checkpoint.get(CHECKPOINT_KEY) or {}).get("plan")
    return PrunePlan.from_dict(data) if data else None


def validate_ratio(ratio: float) -> float:
    """Return ``ratio`` as float if it lies in (0, 1).

    Raises:
        ValueError: Otherwise.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"`ratio` (fraction of MLP neurons to remove) must be in (0, 1); got {ratio!r}")
    return float(ratio)


def validate_multiple_of(multiple_of: int, width: int | None = None) -> int:
    """Return ``multiple_of`` if it is an integer >= 1 (and <= ``width`` when the MLP width is known).

    Raises:
        ValueError: Otherwise, naming the value and the allowed range.
    """
    upper = f"d_ff={width}" if width is not None else "d_ff"
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1 or (
            width is not None and multiple_of > width):
        raise ValueError(f"`multiple_of` must be an integer in [1, {upper}]; got {multiple_of!r}")
    return multiple_of


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
    validate_multiple_of(multiple_of, width)
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
        criterion: The criterion (see :data:`lit_prune.pruning.importance.CRITERIA`).
        ratio: Nominal pruning ratio.
        multiple_of: Alignment of the kept width.
        seed: Seed used by ``random``.
        aggregation: How activations were aggregated for mean-based criteria (``prompt`` or ``token``).
        capture: Which tokens statistics were captured on: ``prompt`` (the paper) or ``response`` (prompt +
            reference response, teacher-forced).
        refit: Whether ``W_down`` of the kept neurons was re-fitted (the indices alone then do not reproduce the
            pruned weights: they are in the exported checkpoint).
        provenance: Model name, prompt counts and hashes, library versions.
    """

    kept_indices: list[list[int]]
    original_width: int
    criterion: str
    ratio: float
    multiple_of: int = 128
    seed: int = 42
    aggregation: str = "prompt"
    capture: str = "prompt"
    refit: bool = False
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kept_indices:
            raise ValueError("`kept_indices` must hold one index list per layer; got none")
        widths = {len(k) for k in self.kept_indices}
        if len(widths) != 1:
            raise ValueError(f"every layer must keep the same number of neurons; got {sorted(widths)}")

    @property
    def mode(self) -> str:
        """The criterion (the name used before criteria other than the paper's existed)."""
        return self.criterion

    @property
    def label(self) -> str:
        """Short name of how the plan was made, e.g. ``compensated`` or ``wanda_sp+refit``."""
        from lit_prune.pruning.importance import get_criterion

        default = get_criterion(self.criterion).refit if self.criterion in _criteria() else False
        return self.criterion + ("+refit" if self.refit and not default else "")

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
        data.update(kept_width=self.kept_width, exact_ratio=self.exact_ratio, format_version=2)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        """Rebuild a plan from :meth:`to_dict` output (derived keys are ignored)."""
        data = dict(data)
        if "criterion" not in data and "mode" in data:  # plans written before criteria had their own name
            data["criterion"] = data["mode"]
        required = ("kept_indices", "original_width", "criterion", "ratio")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"prune plan lacks keys {missing}")
        return cls(
            kept_indices=[list(map(int, k)) for k in data["kept_indices"]],
            original_width=int(data["original_width"]),
            criterion=str(data["criterion"]),
            ratio=float(data["ratio"]),
            multiple_of=int(data.get("multiple_of", 128)),
            seed=int(data.get("seed", 42)),
            aggregation=str(data.get("aggregation", "prompt")),
            capture=str(data.get("capture", "prompt")),
            refit=bool(data.get("refit", False)),
            provenance=dict(data.get("provenance", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically; a folder gets ``prune_plan.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
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

    def apply(self, model: nn.Module, shapes_only: bool = False) -> nn.Module:
        """Slice ``model`` in place to this plan's kept neurons and return it.

        Args:
            model: The dense model the plan was made for.
            shapes_only: Slice even though the plan re-fitted ``W_down`` (its weights are loaded afterwards, as
                when a run resumes from a checkpoint).

        Raises:
            ValueError: If the model does not have the plan's original shapes, or the plan re-fitted weights
                that it does not carry and ``shapes_only`` is False.
        """
        self.check_model(model)
        if self.refit and not shapes_only:
            raise ValueError(
                f"this {self.label} plan re-fitted down_proj: its indices alone give the uncompensated model. Load "
                "the pruned export instead, use lit_prune.pruning.make_plan(...).apply(model) to prune again, or "
                "pass `shapes_only=True` if the weights are loaded afterwards"
            )
        slice_model(model, self.kept_indices)
        return model


def _criteria() -> tuple[str, ...]:
    from lit_prune.pruning.importance import CRITERIA

    return CRITERIA
