"""Lightning callbacks that prune a Hugging Face causal LM inside any Lightning project.

Installed and imported as ``lit_prune.callbacks``::

    from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback
"""

from lit_prune.callbacks.capture import ActivationCaptureCallback
from lit_prune.callbacks.prune import SelectivityPruneCallback
from lit_prune.callbacks.sparsity import WeightSparsityCallback

__all__ = ["ActivationCaptureCallback", "SelectivityPruneCallback", "WeightSparsityCallback"]
