"""The method itself, in plain torch: find SwiGLU MLPs, stream statistics, score, plan and slice."""

from lit_prune.pruning.importance import CRITERIA, compute_scores, selectivity
from lit_prune.pruning.plan import PLAN_FILENAME, PrunePlan, kept_width, make_plan, validate_ratio
from lit_prune.pruning.stats import (
    AGGREGATIONS,
    GROUPS,
    ActivationRecorder,
    NeuronStats,
    model_fingerprint,
    prompt_set_hash,
)
from lit_prune.pruning.swiglu import MLPBlock, NotSwiGLUError, find_swiglu_mlps, slice_mlp, slice_model

__all__ = [
    "AGGREGATIONS",
    "CRITERIA",
    "GROUPS",
    "PLAN_FILENAME",
    "ActivationRecorder",
    "MLPBlock",
    "NeuronStats",
    "NotSwiGLUError",
    "PrunePlan",
    "compute_scores",
    "find_swiglu_mlps",
    "kept_width",
    "make_plan",
    "model_fingerprint",
    "prompt_set_hash",
    "selectivity",
    "slice_mlp",
    "slice_model",
    "validate_ratio",
]
