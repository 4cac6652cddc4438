"""The Hugging Face export of a PrunableCausalLM: where it may go, its model card and provenance.

The folder is written beside ``export_dir`` and swapped in whole (:func:`lit_prune.io.replace_directory`); it only
replaces a previous lit_prune export unless ``export_overwrite``, and never the source model folder, the run
folder or a ModelCheckpoint folder (:func:`export_dir_rules`).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from lit_prune.pruning.depth import DEPTH_KEY

__all__ = ["EXPORT_ARGUMENT", "OVERWRITE_OPTION", "export_dir_rules", "model_card", "render_card"]

EXPORT_ARGUMENT = "`model.export_dir`"
OVERWRITE_OPTION = "model.export_overwrite=True"


def export_dir_rules(module) -> dict:
    """Where the export may not go: the source model and tokenizer folders, the run and checkpoint folders."""
    protected = [(f"`model.{name}`", value) for name in ("model_name_or_path", "tokenizer_name_or_path")
                 if (value := module.hparams.get(name)) and Path(value).expanduser().is_dir()]
    containers = []
    trainer = module._trainer
    if trainer is not None:
        containers.append(("`trainer.default_root_dir`", trainer.default_root_dir))
        protected += [("a ModelCheckpoint `dirpath`", c.dirpath) for c in trainer.checkpoint_callbacks
                      if getattr(c, "dirpath", None)]
    return {"argument": EXPORT_ARGUMENT, "protected": protected, "containers": containers,
            "overwrite": module.export_overwrite, "overwrite_option": OVERWRITE_OPTION}


def model_card(module, extra: dict | None = None) -> dict:
    """Provenance of the exported model: source, method, ratio, data hashes, seeds, versions."""
    import lightning
    import peft
    import transformers

    plan = module.prune_plan
    card = {
        "source_model": module.model_name_or_path,
        "gguf_file": module.gguf_file,
        "method": "task-specific selective MLP neuron pruning (arXiv 2604.27115) with LoRA recovery",
        "pruning": None if plan is None else {
            "mode": plan.mode, "nominal_ratio": plan.ratio, "exact_ratio": plan.exact_ratio,
            "kept_width": plan.kept_width, "original_width": plan.original_width,
            "multiple_of": plan.multiple_of, "seed": plan.seed, "aggregation": plan.aggregation,
            "provenance": plan.provenance,
        },
        # Set by WeightSparsityCallback.on_fit_end: method, pattern, sparsity measured on the final weights.
        "sparsity": getattr(module, "weight_sparsity", None),
        # Set by DepthPruneCallback: the removed blocks, scores and parameter ratio (before any width pruning).
        DEPTH_KEY: None if module.depth_plan is None else module.depth_plan.to_dict(),
        "lora": None if module.lora is None else asdict(module.lora),
        "learning_rate": module.hparams.learning_rate,
        "global_step": module._trainer.global_step if module._trainer is not None else 0,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "lightning": lightning.__version__,
                     "peft": peft.__version__},
    }
    card.update(extra or {})
    return card


def render_card(card: dict) -> str:
    pruning = card.get("pruning") or {}
    lines = [
        "---", "library_name: transformers", "tags: [pruned, lit-prune]", "---", "",
        f"# Pruned {card['source_model']}", "",
        f"Method: {card['method']}.", "",
        f"- Parameters: {card['parameters']:,}",
    ]
    if pruning:
        lines += [f"- Criterion: {pruning['mode']}; nominal ratio {pruning['nominal_ratio']:.2%}, exact "
                  f"{pruning['exact_ratio']:.2%} (MLP width {pruning['original_width']} -> {pruning['kept_width']}, "
                  f"multiple of {pruning['multiple_of']}, seed {pruning['seed']})",
                  f"- Capture data: {json.dumps(pruning['provenance'])}"]
    depth = card.get(DEPTH_KEY) or {}
    if depth:
        lines.append(f"- Depth: removed blocks {depth['removed_blocks']} of {depth['original_num_layers']} "
                     f"({depth['criterion']}, {depth['param_ratio']:.2%} of the parameters)")
    if card.get("lora"):
        lines.append(f"- LoRA recovery: {json.dumps(card['lora'])}, lr {card['learning_rate']}, "
                     f"{card['global_step']} steps (merged)")
    lines += [f"- Versions: {json.dumps(card['versions'])}", "",
              "Loads with `AutoModelForCausalLM.from_pretrained` (no custom code); `prune_plan.json` lists the kept "
              "neurons of every layer.", ""]
    return "\n".join(lines)
