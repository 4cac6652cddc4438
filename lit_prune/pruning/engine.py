"""One pruning path: a validated :class:`PruneSpec` and ``make_plan(model, stats, spec) -> PruneResult``.

Every width-pruning decision goes through here, whoever asks for it: the Lightning callbacks, the sweep, the
benchmarks, a plain-torch user::

    spec = PruneSpec(ratio=0.25, criterion="compensated", multiple_of=128)   # validated now
    spec.check_model(model)                      # needs the model: before any capture
    stats = ...                                  # ActivationRecorder(model, **spec.recorder_options())
    result = make_plan(model, stats, spec)       # the plan, and the re-fitted W_down of each layer
    result.apply(model)                          # slice (and write the re-fitted weights)

Validation happens once, when the spec is built (and against the model in :meth:`PruneSpec.check_model`); a
statistic the criterion needs but the capture did not record is reported by :meth:`PruneSpec.check_stats` with
the capture option to turn on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lit_prune.pruning.compensate import obs_select, refit_down
from lit_prune.pruning.importance import CRITERIA, compute_scores, get_criterion
from lit_prune.pruning.plan import PrunePlan, kept_width, validate_multiple_of, validate_ratio
from lit_prune.pruning.stats import AGGREGATIONS, NeuronStats
from lit_prune.pruning.swiglu import find_swiglu_mlps

__all__ = ["CAPTURE_TOKENS", "DEFAULT_CRITERION", "PruneResult", "PruneSpec", "make_plan"]

log = logging.getLogger(__name__)

CAPTURE_TOKENS = ("prompt", "response")
# The default of the CLI and the callbacks: see README ("Which criterion") for the measurements behind it.
DEFAULT_CRITERION = "compensated"


def _validate_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"`seed` must be an integer in [0, 2**63); got {seed!r}")
    return seed


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how, checked when built.

    Attributes:
        ratio: Nominal fraction of every MLP's neurons to remove, in (0, 1).
        criterion: One of :data:`lit_prune.pruning.importance.CRITERIA`.
        multiple_of: The kept width is a multiple of this (128: the paper; 1 turns alignment off).
        seed: Seed of ``random``.
        aggregation: ``prompt`` (one masked mean per prompt, the paper) or ``token``, for mean-based criteria.
        capture: Tokens the statistics are captured on: ``prompt`` (the paper) or ``response`` (prompt + the
            reference response, teacher-forced, where the example has one).
        refit: Re-fit ``W_down`` of the kept neurons on the target Gram matrix (None: the criterion's default,
            True for ``compensated``). Works on top of any criterion.
        damping: Relative damping of the Gram matrix for OBS and the re-fit.
        obs_group: Neurons ``compensated`` removes between two updates of its errors (1 = exact greedy).
    """

    ratio: float
    criterion: str = DEFAULT_CRITERION
    multiple_of: int = 128
    seed: int = 42
    aggregation: str = "token"
    capture: str = "response"
    refit: bool | None = None
    damping: float = 0.01
    obs_group: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", validate_ratio(self.ratio))
        get_criterion(self.criterion)
        validate_multiple_of(self.multiple_of)
        _validate_seed(self.seed)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}; got {self.aggregation!r}")
        if self.capture not in CAPTURE_TOKENS:
            raise ValueError(f"`capture` must be one of {CAPTURE_TOKENS}; got {self.capture!r}")
        if self.refit is not None and not isinstance(self.refit, bool):
            raise ValueError(f"`refit` must be true, false or null; got {self.refit!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 <= self.damping < 1:
            raise ValueError(f"`damping` must be in [0, 1); got {self.damping!r}")
        if isinstance(self.obs_group, bool) or not isinstance(self.obs_group, int) or self.obs_group < 1:
            raise ValueError(f"`obs_group` must be an integer >= 1; got {self.obs_group!r}")
        if self.refit is False and get_criterion(self.criterion).obs:
            raise ValueError(f"criterion {self.criterion!r} always re-fits down_proj; `refit` cannot be false")

    @classmethod
    def paper(cls, ratio: float, **overrides) -> PruneSpec:
        """The paper's setting: ``selective`` on per-prompt means of prompt tokens, 128-aligned."""
        settings = dict(criterion="selective", aggregation="prompt", capture="prompt", multiple_of=128, refit=False)
        settings.update(overrides)
        return cls(ratio, **settings)

    @property
    def refits(self) -> bool:
        """Whether plans of this spec re-fit ``W_down``."""
        return get_criterion(self.criterion).refit if self.refit is None else self.refit

    @property
    def label(self) -> str:
        """``criterion`` plus ``+refit`` when the re-fit is not the criterion's default."""
        default = get_criterion(self.criterion).refit
        return self.criterion + ("+refit" if self.refits and not default else "")

    def needs(self) -> frozenset[str]:
        """What the capture must record: a subset of ``{"distractor", "gram", "gradients"}``."""
        needs = set(get_criterion(self.criterion).needs) - {"weights"}
        if self.refits:
            needs.add("gram")
        return frozenset(needs)

    def replace(self, **changes) -> PruneSpec:
        return replace(self, **changes)

    def check_model(self, model: nn.Module) -> int:
        """Check the spec against the model's MLPs (before any capture) and return the kept width.

        Raises:
            ValueError: If ``multiple_of`` exceeds d_ff or the ratio rounds to nothing or everything.
            NotSwiGLUError: If the model has no SwiGLU MLPs.
        """
        blocks = find_swiglu_mlps(model)
        return kept_width(blocks[0].width, self.ratio, self.multiple_of)

    def check_stats(self, stats: NeuronStats) -> None:
        """Raise if ``stats`` lack a statistic this spec needs, naming the capture option that records it.

        Raises:
            ValueError: For a missing Gram matrix, gradient statistics, distractor set or capture tokens.
        """
        needs = self.needs()
        if "gram" in needs and stats.has_gram:
            empty = [i for i in range(stats.num_layers) if float(stats.gram(i).diagonal().sum()) <= 0]
            if empty:
                raise ValueError(f"the target Gram matrix of layer(s) {empty} is empty (captured with `gram_layers` "
                                 "that left them out, or no target tokens); capture it for every layer")
        if "gram" in needs and not stats.has_gram:
            why = f"criterion {self.criterion!r}" + (" with `refit`" if not get_criterion(self.criterion).refit else "")
            raise ValueError(f"{why} needs the target Gram matrix, which was not captured: turn on "
                             "`ActivationCaptureCallback(gram=True)` (or leave `gram` unset so the callback follows "
                             "the prune callback), or capture with `ActivationRecorder(model, gram=True)`")
        if "gradients" in needs and not stats.has_gradients:
            raise ValueError(f"criterion {self.criterion!r} needs gradient statistics, which were not captured: turn "
                             "on `ActivationCaptureCallback(gradients=True)` (or leave it unset), or call "
                             "`ActivationRecorder(model, gradients=True).observe_gradients(...)`")
        if "distractor" in needs and float(stats.count("distractor", "prompt")) <= 0:
            raise ValueError(f"criterion {self.criterion!r} compares target with distractor activations, but no "
                             "distractor prompts were captured")
        if float(stats.count("target", "prompt")) <= 0:
            raise ValueError("no target prompts were captured")
        captured = stats.metadata.get("capture")
        if captured is not None and captured != self.capture:
            raise ValueError(f"the statistics were captured on {captured} tokens but the spec asks for `capture`="
                             f"{self.capture!r}; capture again with `ActivationCaptureCallback(capture="
                             f"{self.capture!r})`")


@dataclass
class PruneResult:
    """A plan and, for re-fitting specs, the new ``W_down`` of every layer (shape (d, kept_width)).

    Attributes:
        plan: The kept neurons and how they were chosen.
        down_weights: Re-fitted ``down_proj`` weights per layer (float64, CPU), or None.
        seconds: Wall time of scoring, selection and re-fit.
    """

    plan: PrunePlan
    down_weights: list[torch.Tensor] | None = None
    seconds: dict = field(default_factory=dict)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Slice ``model`` in place to the plan and write the re-fitted ``W_down`` (if any)."""
        self.plan.apply(model, shapes_only=True)
        if self.down_weights is not None:
            for block, weight in zip(find_swiglu_mlps(model), self.down_weights):
                target = block.down_proj.weight
                target.copy_(weight.to(device=target.device, dtype=target.dtype))
        return model


@torch.no_grad()
def make_plan(model: nn.Module, stats: NeuronStats, spec: PruneSpec, provenance: dict | None = None) -> PruneResult:
    """Score (or select) the neurons of every layer of the dense ``model`` and plan the kept width.

    Args:
        model: The dense model the statistics were captured on (its weights feed weight-based criteria and
            the re-fit; it is not modified).
        stats: Captured statistics.
        spec: What to prune.
        provenance: Extra provenance for the plan (model name, ...).

    Raises:
        ValueError: If the statistics do not fit the model or lack what the spec needs, or the spec does not fit
            the model.
    """
    stats.check_compatible(model)
    spec.check_stats(stats)
    width = spec.check_model(model)
    blocks = find_swiglu_mlps(model)
    criterion = get_criterion(spec.criterion)
    seconds = {}
    start = time.perf_counter()
    if criterion.obs:
        kept = torch.stack([obs_select(b.down_proj.weight.detach(), stats.gram(b.layer_index).cpu(), width,
                                       group_size=spec.obs_group, damping=spec.damping) for b in blocks])
    else:
        scores = compute_scores(stats, spec.criterion, blocks, spec.aggregation, spec.seed)
        kept = torch.topk(scores, width, dim=1, sorted=False).indices.sort(dim=1).values
    seconds["select"] = time.perf_counter() - start
    down_weights = None
    if spec.refits:
        start = time.perf_counter()
        down_weights = [refit_down(b.down_proj.weight.detach().cpu(), stats.gram(b.layer_index).cpu(), kept[i],
                                   spec.damping) for i, b in enumerate(blocks)]
        seconds["refit"] = time.perf_counter() - start
    info = {k: v for k, v in stats.metadata.items()}
    info.update(provenance or {})
    info.setdefault("target_prompts", int(stats.count("target", "prompt")))
    info.setdefault("distractor_prompts", int(stats.count("distractor", "prompt")))
    info.setdefault("target_tokens", int(stats.count("target", "token")))
    plan = PrunePlan(kept.tolist(), stats.width, spec.criterion, spec.ratio, spec.multiple_of, spec.seed,
                     spec.aggregation, spec.capture, spec.refits, info)
    log.info("planned %s: kept %d of %d neurons per layer (%s)", spec.label, width, stats.width,
             ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
    return PruneResult(plan, down_weights, seconds)


assert DEFAULT_CRITERION in CRITERIA
