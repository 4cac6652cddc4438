"""Lightning callbacks that prune a Hugging Face causal LM inside any Lightning project.

Installed and imported as ``lit_prune.callbacks``::

    from lit_prune.callbacks import ActivationCaptureCallback, DepthPruneCallback, SelectivityPruneCallback
"""

from lit_prune.callbacks.capture import ActivationCaptureCallback
from lit_prune.callbacks.depth import DepthPruneCallback
from lit_prune.callbacks.prune import SelectivityPruneCallback
from lit_prune.callbacks.routing import DynamicDepthCallback
from lit_prune.callbacks.sparsity import WeightSparsityCallback

__all__ = [
    "ActivationCaptureCallback",
    "DepthPruneCallback",
    "DynamicDepthCallback",
    "SelectivityPruneCallback",
    "WeightSparsityCallback",
]
