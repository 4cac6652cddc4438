"""Per-neuron importance scores from :class:`NeuronStats`; higher means keep.

``selective`` is the paper's selectivity (Sec. 3.3, Eq. 5-6)::

    S_n = (mu_target,n - mu_distractor,n) / (sigma_n + 1e-6)

with ``sigma_n`` the unbiased standard deviation of neuron ``n`` over all prompts pooled. Pruning keeps the
highest scores, so ``selective`` drops distractor-selective neurons and ``reverse`` drops target-selective
ones. ``random`` draws seeded scores (the paper's control, seeds 42 and 33). ``target_mean`` ranks by the
plain mean ``|h|`` on target prompts: a free control that beats selectivity at high ratios on small models
(see ARCHITECTURE.md), so every sweep should include it.

Every criterion has the signature ``criterion(stats, generator) -> Tensor (layers, d_ff)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lit_prune.pruning.stats import NeuronStats

__all__ = ["CRITERIA", "EPSILON", "compute_scores", "selectivity"]

log = logging.getLogger(__name__)

EPSILON = 1e-6


def selectivity(stats: NeuronStats) -> torch.Tensor:
    """The paper's selectivity ``(mu_t - mu_d) / (sigma + 1e-6)`` per layer and neuron, float64."""
    return (stats.group_mean("target") - stats.group_mean("distractor")) / (stats.pooled_std() + EPSILON)


def _selective(stats: NeuronStats, generator: torch.Generator | None) -> torch.Tensor:
    return selectivity(stats)


def _reverse(stats: NeuronStats, generator: torch.Generator | None) -> torch.Tensor:
    return -selectivity(stats)


def _random(stats: NeuronStats, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(stats.shape, generator=generator, dtype=torch.float64)


def _target_mean(stats: NeuronStats, generator: torch.Generator | None) -> torch.Tensor:
    return stats.group_mean("target")


_CRITERIA: dict[str, Callable[[NeuronStats, torch.Generator | None], torch.Tensor]] = {
    "selective": _selective,
    "reverse": _reverse,
    "random": _random,
    "target_mean": _target_mean,
}
CRITERIA = tuple(_CRITERIA)


def compute_scores(stats: NeuronStats, mode: str, seed: int = 42) -> torch.Tensor:
    """Scores of every neuron under criterion ``mode`` (higher = keep), on the CPU in float64.

    Args:
        stats: Captured statistics.
        mode: One of :data:`CRITERIA`.
        seed: Seed of the ``torch.Generator`` for ``random`` (ignored otherwise).

    Raises:
        ValueError: If ``mode`` is unknown, or a group the criterion needs is empty.
    """
    if mode not in _CRITERIA:
        raise ValueError(f"`mode` must be one of {CRITERIA}; got {mode!r}")
    generator = torch.Generator().manual_seed(seed)
    return _CRITERIA[mode](stats.to("cpu"), generator)
