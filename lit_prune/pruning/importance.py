"""Per-neuron importance scores of every width criterion; higher means keep.

Every criterion is a :class:`Criterion`: a function ``(stats, blocks, aggregation, generator) -> (L, d_ff)``
plus what it needs (the distractor group, the MLP weights, the target Gram matrix, gradient statistics), so
that capture switches on exactly those statistics and a missing one is reported before capture starts.
Notation: ``h`` is the input of ``down_proj`` (the SwiGLU intermediate), ``W_gate``/``W_up`` (d_ff, d) and
``W_down`` (d, d_ff) the MLP weights, sums run over valid (non-padding) tokens of the target set unless
stated otherwise.

=================  ============================================================================  ===========
name               score of neuron ``n``                                                          source
=================  ============================================================================  ===========
``selective``      ``(mu_t,n - mu_d,n) / (sigma_n + 1e-6)``, ``mu`` the mean ``|h_n|`` of each     the paper
                   group, ``sigma_n`` the unbiased std over both groups pooled                     Eq. 5-6
``reverse``        ``-selective``                                                                  the paper
``random``         seeded uniform scores                                                           the paper
``target_mean``    ``mu_t,n``                                                                      control
``magnitude``      ``sqrt(||W_gate[n,:]||^2 + ||W_up[n,:]||^2 + ||W_down[:,n]||^2)``               LLM-Pruner
``wanda_sp``       ``mean_j |W_down[j,n]| * sqrt(sum_t h_n^2 / T)``                                FLAP code
``flap``           ``Var_t(h_n) * ||W_down[:,n]||^2`` (WIFV)                                       FLAP Eq. 5
``minitron``       ``sqrt(sum_p (mean_{t in p} |h_n|)^2)``, the L2 norm over prompts               Minitron
``taylor``         ``|sum_t h_n * dL/dh_n|`` on the target loss                                    LLM-Pruner
``taylor_fisher``  ``sum_p (sum_{t in p} h_n * dL/dh_n)^2`` (second-order, Fisher)                  LLM-Pruner
``energy``         ``||W_down[:,n]||^2 * sum_t h_n^2``: the output error of dropping ``n`` alone     ours
``compensated``    greedy OBS on the target Gram: drop the neuron with the smallest                ours
                   ``||W_down[:,n]||^2 / [G^-1]_nn``, update, repeat; then re-fit ``W_down``       (OBS/OBC)
=================  ============================================================================  ===========

``aggregation`` (``prompt``: one masked mean per prompt, the paper; ``token``: every valid token) applies to the
criteria built on ``mu`` (``selective``, ``reverse``, ``target_mean``). ``compensated`` is a selection, not a
score: :func:`lit_prune.pruning.compensate.obs_select` implements it, and ``score`` here returns the first-step
OBS errors (exact for the first neuron removed). Sources: Wanda-sp and FLAP: An et al., "Fluctuation-based
Adaptive Structured Pruning for Large Language Models" (AAAI 2024) and its code (``W_metric`` of the ``wanda_sp``
and ``flap`` prune functions, MLP case); Minitron: Muralidharan et al., "Compact Language Models via Pruning
and Knowledge Distillation" (2024), Sec. 2.2 (neuron importance as the aggregated L2 norm of activations; we take
the mean over tokens inside a prompt and the L2 norm over prompts, as the issue specifies); LLM-Pruner: Ma et
al., "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS 2023), Eq. 3-5 (a neuron group's
first-order importance ``|sum W * dL/dW|``; for the down column it equals ``|sum_t h_n dL/dh_n|``, which we use
for the whole neuron); OBS: Hassibi & Stork, "Optimal Brain Surgeon" (1993), and Frantar & Alistarh, "Optimal
Brain Compression" (2022), Sec. 3.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lit_prune.pruning.stats import NeuronStats
from lit_prune.pruning.swiglu import MLPBlock

__all__ = ["CRITERIA", "EPSILON", "NEEDS", "Criterion", "compute_scores", "get_criterion", "selectivity"]

log = logging.getLogger(__name__)

EPSILON = 1e-6
# What a criterion may need beyond the target group's forward statistics.
NEEDS = ("distractor", "weights", "gram", "gradients")

ScoreFn = Callable[[NeuronStats, Sequence[MLPBlock], str, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """A width criterion: its score function and what it needs.

    Attributes:
        name: Registry name.
        score: ``(stats, blocks, aggregation, generator) -> (L, d_ff)`` float64 on the CPU, higher = keep.
        needs: A subset of :data:`NEEDS`.
        refit: Whether its plans re-fit ``W_down`` on the kept neurons by default.
        obs: Whether the kept set is chosen by greedy OBS on the Gram matrix rather than by top-k of ``score``.
        source: Where the formula comes from.
    """

    name: str
    score: ScoreFn
    needs: frozenset[str]
    refit: bool = False
    obs: bool = False
    source: str = ""


def selectivity(stats: NeuronStats, aggregation: str = "prompt") -> torch.Tensor:
    """The paper's selectivity ``(mu_t - mu_d) / (sigma + 1e-6)`` per layer and neuron, float64."""
    return ((stats.group_mean("target", aggregation) - stats.group_mean("distractor", aggregation))
            / (stats.pooled_std(aggregation) + EPSILON))


def _weights(blocks: Sequence[MLPBlock], name: str) -> torch.Tensor:
    """``(L, ...)`` float64 CPU stack of one projection's weights over the layers."""
    return torch.stack([getattr(b, name).weight.detach().double().cpu() for b in blocks])


def _down_column_sq_norms(blocks: Sequence[MLPBlock]) -> torch.Tensor:
    return _weights(blocks, "down_proj").pow(2).sum(dim=1)  # (L, d, d_ff) -> (L, d_ff)


def _selective(stats, blocks, aggregation, generator):
    return selectivity(stats, aggregation)


def _reverse(stats, blocks, aggregation, generator):
    return -selectivity(stats, aggregation)


def _random(stats, blocks, aggregation, generator):
    return torch.rand(stats.shape, generator=generator, dtype=torch.float64)


def _target_mean(stats, blocks, aggregation, generator):
    return stats.group_mean("target", aggregation)


def _magnitude(stats, blocks, aggregation, generator):
    return (_weights(blocks, "gate_proj").pow(2).sum(dim=2) + _weights(blocks, "up_proj").pow(2).sum(dim=2)
            + _down_column_sq_norms(blocks)).sqrt()


def _wanda_sp(stats, blocks, aggregation, generator):
    return _weights(blocks, "down_proj").abs().mean(dim=1) * stats.token_mean_square("target").sqrt()


def _flap(stats, blocks, aggregation, generator):
    return stats.token_variance("target") * _down_column_sq_norms(blocks)


def _minitron(stats, blocks, aggregation, generator):
    if float(stats.count("target", "prompt")) <= 0:
        raise ValueError("the target set is empty: no target prompts were captured")
    return stats["target.prompt_mean_sq_sum"].sqrt()


def _taylor(stats, blocks, aggregation, generator):
    return stats["target.grad_sum"].abs()


def _taylor_fisher(stats, blocks, aggregation, generator):
    return stats["target.grad_sq_sum"]


def _energy(stats, blocks, aggregation, generator):
    return _down_column_sq_norms(blocks) * stats["target.sq_sum"]


def _obs_first_errors(stats, blocks, aggregation, generator):
    from lit_prune.pruning.compensate import damped_gram

    down = _down_column_sq_norms(blocks)
    errors = []
    for layer in range(stats.num_layers):
        inverse_diagonal = torch.linalg.inv(damped_gram(stats.gram(layer).cpu())).diagonal()
        errors.append(down[layer] / inverse_diagonal)
    return torch.stack(errors)


_REGISTRY: dict[str, Criterion] = {c.name: c for c in (
    Criterion("selective", _selective, frozenset({"distractor"}), source="arXiv 2604.27115 Eq. 5-6"),
    Criterion("reverse", _reverse, frozenset({"distractor"}), source="arXiv 2604.27115 (control)"),
    Criterion("random", _random, frozenset(), source="arXiv 2604.27115 (control, seeds 42/33)"),
    Criterion("target_mean", _target_mean, frozenset(), source="lit_prune control"),
    Criterion("magnitude", _magnitude, frozenset({"weights"}), source="LLM-Pruner (magnitude baseline)"),
    Criterion("wanda_sp", _wanda_sp, frozenset({"weights"}), source="FLAP code, wanda_sp"),
    Criterion("flap", _flap, frozenset({"weights"}), source="FLAP Eq. 5 (WIFV)"),
    Criterion("minitron", _minitron, frozenset(), source="Minitron Sec. 2.2"),
    Criterion("taylor", _taylor, frozenset({"gradients"}), source="LLM-Pruner Eq. 3-5, first order"),
    Criterion("taylor_fisher", _taylor_fisher, frozenset({"gradients"}), source="LLM-Pruner, second order"),
    Criterion("energy", _energy, frozenset({"weights"}), source="lit_prune (diagonal OBS error)"),
    Criterion("compensated", _obs_first_errors, frozenset({"weights", "gram"}), refit=True, obs=True,
              source="lit_prune: greedy OBS (Hassibi & Stork 1993; OBC 2022) + least-squares re-fit"),
)}
CRITERIA = tuple(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``.

    Raises:
        ValueError: Naming the allowed criteria, if ``name`` is unknown.
    """
    if name not in _REGISTRY:
        raise ValueError(f"`criterion` must be one of {CRITERIA}; got {name!r}")
    return _REGISTRY[name]


def compute_scores(stats: NeuronStats, criterion: str, blocks: Sequence[MLPBlock] | None = None,
                   aggregation: str = "prompt", seed: int = 42) -> torch.Tensor:
    """Scores of every neuron under ``criterion`` (higher = keep), on the CPU in float64.

    Args:
        stats: Captured statistics.
        criterion: One of :data:`CRITERIA`.
        blocks: The model's MLP blocks (``find_swiglu_mlps``), for criteria that read weights.
        aggregation: ``prompt`` or ``token``, for the criteria built on group means.
        seed: Seed of the ``torch.Generator`` for ``random``.

    Raises:
        ValueError: If the criterion is unknown, needs weights and ``blocks`` is None, or a statistic it needs
            is missing or empty.
    """
    spec = get_criterion(criterion)
    if "weights" in spec.needs and blocks is None:
        raise ValueError(f"criterion {criterion!r} reads the MLP weights: pass `blocks`")
    generator = torch.Generator().manual_seed(seed)
    return spec.score(stats.to("cpu"), blocks, aggregation, generator)
