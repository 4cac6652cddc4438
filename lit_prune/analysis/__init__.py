"""Analyses of what pruning does: semantic coverage of calibration sets, the calibration-data study, neuron
semantic attribution and activation-guided masked-L2 pruning, after "Revisiting Large Language Model Pruning using
Neuron Semantic Attribution" (NSA, arXiv 2503.01542).

The names below are imported from their submodule on first use (PEP 562): ``import lit_prune.analysis.coverage``
does not load the pruning engine, and ``python -m lit_prune.analysis.calibration`` does not import itself twice.
"""

import importlib

_EXPORTS = {
    "Attribution": "lit_prune.analysis.attribution",
    "Correlation": "lit_prune.analysis.calibration",
    "MaskedL2Spec": "lit_prune.analysis.masked_l2",
    "PREDICATES": "lit_prune.analysis.attribution",
    "TokenPredicate": "lit_prune.analysis.attribution",
    "apply_reading": "lit_prune.analysis.masked_l2",
    "attribution_after": "lit_prune.analysis.attribution",
    "calibration_study": "lit_prune.analysis.calibration",
    "channel_activations": "lit_prune.analysis.masked_l2",
    "correlation": "lit_prune.analysis.calibration",
    "coverage_from_embeddings": "lit_prune.analysis.coverage",
    "finetune_with_penalty": "lit_prune.analysis.masked_l2",
    "jaccard": "lit_prune.analysis.calibration",
    "low_activation_channels": "lit_prune.analysis.masked_l2",
    "magnitude_masks": "lit_prune.analysis.masked_l2",
    "mask_statistics": "lit_prune.analysis.masked_l2",
    "masked_l2_penalty": "lit_prune.analysis.masked_l2",
    "masked_l2_study": "lit_prune.analysis.masked_l2",
    "neuron_relevance": "lit_prune.analysis.attribution",
    "random_jaccard": "lit_prune.analysis.calibration",
    "relevant_token_mask": "lit_prune.analysis.attribution",
    "semantic_coverage": "lit_prune.analysis.coverage",
    "target_nll": "lit_prune.analysis.calibration",
    "token_activations": "lit_prune.analysis.attribution",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
