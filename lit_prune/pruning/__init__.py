"""The method itself, in plain torch: find SwiGLU MLPs, stream statistics, score, plan, re-fit and slice; score and
remove whole decoder blocks (depth)."""

from lit_prune.pruning.compensate import damped_gram, obs_select, refit_down
from lit_prune.pruning.depth import (
    DEPTH_CRITERIA,
    DepthPlan,
    DepthSpec,
    blocks_for_param_ratio,
    decoder_blocks,
    depth_scores,
    make_depth_plan,
    read_checkpoint_depth_plan,
    remove_blocks,
    width_param_fraction,
)
from lit_prune.pruning.engine import CAPTURE_TOKENS, DEFAULT_CRITERION, PruneResult, PruneSpec, make_plan
from lit_prune.pruning.importance import CRITERIA, Criterion, compute_scores, get_criterion, selectivity
from lit_prune.pruning.plan import PLAN_FILENAME, PrunePlan, kept_width, read_checkpoint_plan, validate_ratio
from lit_prune.pruning.stats import (
    AGGREGATIONS,
    GROUPS,
    ActivationRecorder,
    NeuronStats,
    StatsFileError,
    model_fingerprint,
    prompt_set_hash,
)
from lit_prune.pruning.swiglu import MLPBlock, NotSwiGLUError, find_swiglu_mlps, slice_mlp, slice_model

__all__ = [
    "AGGREGATIONS",
    "CAPTURE_TOKENS",
    "CRITERIA",
    "DEFAULT_CRITERION",
    "DEPTH_CRITERIA",
    "GROUPS",
    "PLAN_FILENAME",
    "ActivationRecorder",
    "Criterion",
    "DepthPlan",
    "DepthSpec",
    "MLPBlock",
    "NeuronStats",
    "NotSwiGLUError",
    "PrunePlan",
    "PruneResult",
    "PruneSpec",
    "StatsFileError",
    "blocks_for_param_ratio",
    "compute_scores",
    "damped_gram",
    "decoder_blocks",
    "depth_scores",
    "find_swiglu_mlps",
    "get_criterion",
    "kept_width",
    "make_depth_plan",
    "make_plan",
    "model_fingerprint",
    "obs_select",
    "prompt_set_hash",
    "read_checkpoint_depth_plan",
    "read_checkpoint_plan",
    "refit_down",
    "remove_blocks",
    "selectivity",
    "slice_mlp",
    "slice_model",
    "validate_ratio",
    "width_param_fraction",
]
