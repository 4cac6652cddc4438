"""``python -m lit_prune fit|validate|test|predict|demo|sweep --config configs/x.yaml``: a LightningCLI."""

from __future__ import annotations

import logging
import os

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lit_prune.data.datamodule import PruneDataModule
from lit_prune.trainer import LitPruneTrainer
from lit_prune.module import PrunableCausalLM

__all__ = ["LitPruneCLI", "cli_main"]

log = logging.getLogger(__name__)


class LitPruneCLI(LightningCLI):
    """LightningCLI for :class:`PrunableCausalLM` and :class:`PruneDataModule`.

    ``fit --ckpt_path X`` (a path or ``last``) is resolved by :meth:`LitPruneTrainer.fit` into
    ``trainer.ckpt_path`` before fitting: Lightning tells callbacks about the checkpoint during ``setup`` only
    that way, and the pruning callbacks need it to replay the stored plan instead of capturing again.

    Besides Lightning's subcommands it has ``demo`` and ``sweep`` (methods of :class:`LitPruneTrainer`).
    """

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands.update(demo={"model", "datamodule"}, sweep={"model", "datamodule"})
        return commands


def cli_main(args: list[str] | dict | None = None, run: bool = True,
             cli_class: type[LitPruneCLI] = LitPruneCLI) -> LitPruneCLI:
    """Run the CLI (``args`` as in ``LightningCLI``; None reads ``sys.argv``; ``cli_class`` a subclass)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cli_class(
        PrunableCausalLM,
        PruneDataModule,
        trainer_class=LitPruneTrainer,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m lit_prune", "description": DESCRIPTION},
    )


DESCRIPTION = ("lit_prune: prune a task-specialised SwiGLU LLM (MLP neurons, weight masks or whole blocks) on "
               "captured activations, recover it with LoRA and evaluate it, in one Lightning Trainer loop. "
               "Subcommands: fit (capture, prune, recover, export), test (evaluate; prunes first if the config "
               "has prune callbacks), validate, predict, demo (dense vs pruned vs recovered on the toy model), "
               "sweep (every criterion and structure side by side).")
