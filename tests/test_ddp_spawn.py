"""``ddp_spawn`` on CPU with 2 processes: the parent process ends with rank 0's pruned (merged) model and its plan.

Lightning's ``_MultiProcessingLauncher`` loads rank 0's ``state_dict()`` into the parent's module after the
children finish; the parent never ran the callbacks' ``setup``, so before the fix it was still dense and the
load failed (``size mismatch ... [192, 64] ... [256, 64]``, exit status 1 after a successful export).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback
from lit_prune.data import PruneDataModule
from lit_prune.module import LoraSettings, PrunableCausalLM
from lit_prune.pruning import PrunePlan, find_swiglu_mlps
from lit_prune.spawn import handover_file
from lit_prune.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GSM8K = str(SHARED / "gsm8k" / "train.jsonl")
SQUAD = str(SHARED / "squad" / "small-v2.json")
DIALOG = str(SHARED / "dailydialog" / "validation.txt")
SPAWN = ["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _same_logits(model_a, model_b):
    input_ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model_a.eval()(input_ids).logits, model_b.eval()(input_ids).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("configs", [["tiny.yaml", "prune-only-tiny.yaml"], ["tiny.yaml"]], ids=["prune-only", "lora"])
def test_cli_ddp_spawn_exits_0(tmp_path, tiny_dir, configs):
    export = tmp_path / "export"
    command = [sys.executable, "-m", "lit_prune", "fit"]
    for config in configs:
        command += ["--config", str(ROOT / "configs" / config)]
    command += [*SPAWN, f"--model.model_name_or_path={tiny_dir}", f"--model.export_dir={export}",
                "--model.merge_on_export=true", f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--trainer.enable_progress_bar=false"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert reloaded.config.intermediate_size == 192
    assert PrunePlan.load(export).kept_width == 192


@pytest.mark.slow
def test_python_ddp_spawn_leaves_the_parent_with_the_merged_pruned_model(tmp_path, tiny_dir):
    export = tmp_path / "export"
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                              export_dir=str(export), merge_on_export=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[ActivationCaptureCallback(batch_size=4, progress=False),
                                   SelectivityPruneCallback(0.25, multiple_of=32)])
    L.seed_everything(0)
    trainer.fit(module, datamodule=PruneDataModule(target=GSM8K, distractors=[SQUAD, DIALOG], capture_samples=8,
                                                   finetune=GSM8K, finetune_samples=16, val_samples=0,
                                                   max_length=512, batch_size=2))
    assert trainer.state.finished  # (the parent's own loop counters stay at 0: only rank 0's weights come back)
    assert not module.is_lora_wrapped  # merged, as rank 0 exported it
    assert [b.width for b in find_swiglu_mlps(module.model)] == [192, 192]
    assert module.prune_plan is not None
    assert module.prune_plan.kept_indices == PrunePlan.load(export).kept_indices
    assert module.exported_to == export
    assert not handover_file(module).exists()  # the hand-over file is consumed
    _same_logits(module.model, AutoModelForCausalLM.from_pretrained(export))
