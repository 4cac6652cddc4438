"""Recipes: the project's experiments as plain functions of a :class:`~lit_prune.trainer.LitPruneTrainer`.

- :func:`run_demo`: dense vs the paper's ``selective`` vs the configured criterion, pruned and recovered.
- :func:`run_sweep`: every criterion and structure at every ratio, with a report.

LightningCLI runs them as ``python -m lit_prune demo|sweep`` (they are the trainer's ``demo`` and ``sweep``).
"""

from lit_prune.recipes.demo import run_demo
from lit_prune.recipes.sweep import equal_size_sparsity, params_removed, run_sweep

__all__ = ["equal_size_sparsity", "params_removed", "run_demo", "run_sweep"]
