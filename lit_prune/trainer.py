"""LitPruneTrainer: a Lightning ``Trainer`` whose extra methods LightningCLI exposes as subcommands next to ``fit``
and ``test``:

* ``python -m lit_prune demo --config configs/demo.yaml``: :func:`lit_prune.recipes.run_demo`.
* ``python -m lit_prune sweep --config configs/sweep-toy.yaml``: :func:`lit_prune.recipes.run_sweep`.

The recipes are plain functions of a ``LitPruneTrainer`` (``run_sweep(trainer, model, datamodule, ...)``); the
methods are the same functions, so the CLI reads their arguments and docstrings from one place.

``LitPruneTrainer.fit`` resolves ``ckpt_path`` (a path, ``"last"``, ``"hpc"``, ``"best"``) before fitting and sets
``trainer.ckpt_path``: Lightning shows the checkpoint to callbacks during ``setup`` only that way, and the pruning
callbacks need it to replay the stored plan instead of capturing again. :meth:`LitPruneTrainer.variant_trainer`
builds a fresh Trainer with the same arguments (no callbacks, logger or checkpointing) for each variant a recipe
evaluates, so no state leaks from one variant to the next.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from lit_prune.recipes.demo import run_demo
from lit_prune.recipes.sweep import run_sweep

__all__ = ["LitPruneTrainer"]

log = logging.getLogger(__name__)


class LitPruneTrainer(L.Trainer):
    """A Lightning ``Trainer`` with the project's recipes as methods (``demo``, ``sweep``)."""

    demo = run_demo
    sweep = run_sweep

    def __init__(self, *args, **kwargs) -> None:
        bound = inspect.signature(L.Trainer.__init__).bind(self, *args, **kwargs)
        self._init_arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        super().__init__(*args, **kwargs)

    def variant_trainer(self, **overrides) -> L.Trainer:
        """A fresh Trainer with this one's settings but no callbacks, logger or checkpointing."""
        arguments = dict(self._init_arguments)
        arguments.update(callbacks=[], logger=False, enable_checkpointing=False, enable_model_summary=False)
        arguments.update(overrides)
        # Lightning's "GPU available / TPU / tip" banner was printed once by this Trainer: not again per variant.
        banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = banner.level
        banner.setLevel(logging.WARNING)
        try:
            return L.Trainer(**arguments)
        finally:
            banner.setLevel(level)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None,
            weights_only=None) -> None:
        """``Trainer.fit``, with ``ckpt_path`` resolved and set as ``trainer.ckpt_path`` first (see the module doc).

        Raises:
            FileNotFoundError: If ``ckpt_path`` names a file that does not exist (before any capture).
        """
        if ckpt_path is not None:
            resolved = ckpt_path
            if str(ckpt_path) in ("last", "best", "hpc", "registry"):
                resolved = self._checkpoint_connector._parse_ckpt_path(
                    TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False)
            elif not Path(ckpt_path).is_file() and "://" not in str(ckpt_path):
                raise FileNotFoundError(f"`ckpt_path`={str(ckpt_path)!r} does not exist; give a checkpoint file or "
                                        "'last'")
            if resolved:
                self.ckpt_path = resolved
        try:
            return super().fit(model, train_dataloaders, val_dataloaders, datamodule, None, weights_only)
        finally:
            if ckpt_path is not None:
                self.ckpt_path = None  # a later test()/validate() on this Trainer must not reload the resume file
