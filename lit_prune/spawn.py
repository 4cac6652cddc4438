"""ddp_spawn: hand the pruned model's shapes from rank 0 back to the parent process.

Lightning's _MultiProcessingLauncher (ddp_spawn, ddp_fork, ddp_notebook) runs `fit` in child processes, then
loads local rank 0's `state_dict()` into the parent's module (`_recover_results_in_main_process`). The
parent never ran the callbacks' `setup`, so its model is still dense and unwrapped: the pruned weights do
not fit. Rank 0 therefore leaves its plan in a file named by a token the parent created (the module is
pickled into the children), and the parent applies it in `load_state_dict`, just before the weights load.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from lit_prune.io import atomic_write_text
from lit_prune.pruning.depth import DepthPlan
from lit_prune.pruning.plan import PrunePlan

__all__ = ["adopt", "hand_over", "handover_file"]


def handover_file(module) -> Path:
    """The file a ddp_spawn child leaves for the parent of ``module`` (named by the module's token)."""
    return Path(tempfile.gettempdir()) / f"lit_prune-spawn-{module._spawn_token}.json"


def hand_over(module) -> None:
    """In local rank 0 of a spawned ``fit``: leave the final plan, LoRA state and export path for the parent."""
    trainer = module.trainer
    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) or trainer.local_rank != 0:
        return
    atomic_write_text(handover_file(module), json.dumps({
        "plan": None if module.prune_plan is None else module.prune_plan.to_dict(),
        "depth_plan": None if module.depth_plan is None else module.depth_plan.to_dict(),
        "lora_wrapped": module.is_lora_wrapped,
        "exported_to": None if module.exported_to is None else str(module.exported_to),
    }))


def adopt(module) -> None:
    """In the parent of a ddp_spawn run: give the model the shapes rank 0 ended with (plan, LoRA) and its plan.

    The parent's module is not attached to the trainer (``_run`` only happens in the children), so the
    hand-over file itself, named by this module's token and written by a child, says that this is such a load.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return  # a child process itself
    handover = handover_file(module)
    if not handover.is_file():
        return
    final = json.loads(handover.read_text())
    handover.unlink()
    if final.get("depth_plan") is not None:  # blocks first: the width plan indexes the remaining ones
        depth = DepthPlan.from_dict(final["depth_plan"])
        if not depth.is_applied(module.model):
            module.record_modification(depth.label)  # the parent still holds the dense weights here
            depth.apply(module.model)
        module.set_depth_plan(depth)
    if final["plan"] is not None:
        plan = PrunePlan.from_dict(final["plan"])
        model = module.model.get_base_model() if module.is_lora_wrapped else module.model
        if not plan.is_applied(model):
            plan.apply(model, shapes_only=True)  # rank 0's weights (re-fitted ones included) load next
        module.set_prune_plan(plan)
    if final["lora_wrapped"]:
        module.add_lora_adapters()
    if final["exported_to"]:
        module.exported_to = Path(final["exported_to"])
