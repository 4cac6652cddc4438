"""The Lightning side: callbacks in one Trainer loop, the CLI, export, resume, DDP on CPU."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback
from lit_prune.cli import cli_main
from lit_prune.data import PruneDataModule
from lit_prune.module import LoraSettings, PrunableCausalLM
from lit_prune.pruning import (
    NeuronStats,
    PrunePlan,
    PruneSpec,
    find_swiglu_mlps,
    make_plan,
    model_fingerprint,
    selectivity,
)
from lit_prune.tiny import make_tiny_model, save_tiny_model

from conftest import DIALOG, GSM8K, ROOT, SQUAD
from conftest import make_trainer as _trainer


def _datamodule(**overrides):
    kwargs = dict(target=GSM8K, distractors=[SQUAD, DIALOG], capture_samples=12, finetune=GSM8K,
                  finetune_samples=24, val_samples=4, max_length=512, batch_size=4)
    kwargs.update(overrides)
    return PruneDataModule(**kwargs)


def _adapters(module: PrunableCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def test_fit_prunes_before_optimizer_and_trains_only_adapters(tmp_path, tiny_dir):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}

    class OptimizerProbe(Callback):
        def on_train_start(self, trainer, pl_module):
            params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
            names = {id(p): n for n, p in pl_module.named_parameters()}
            self.names = [names[id(p)] for p in params]

    probe = OptimizerProbe()
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=32), probe],
                       tmp_path)
    trainer.fit(module, datamodule=_datamodule())
    assert probe.names and all("lora_" in n for n in probe.names)
    assert all(b.width == 192 for b in find_swiglu_mlps(module.model))
    assert module.prune_plan is not None and module.prune_plan.kept_width == 192
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in module.model.named_parameters() if "lora_" not in n}
    untouched = [n for n, p in frozen.items() if "mlp" not in n and torch.equal(p, before[n])]
    assert len(untouched) == sum("mlp" not in n for n in before)  # base weights outside the MLPs never moved


def test_callbacks_in_an_existing_lightning_project(tmp_path):
    """A user's own LightningModule + the two callbacks; prompts are passed to the callback directly."""

    class UserModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = make_tiny_model(seed=3)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)

    module = UserModule()
    data = torch.utils.data.DataLoader(torch.randint(3, 300, (8, 16)), batch_size=4, collate_fn=lambda r: [
        torch.stack(r)])
    capture = ActivationCaptureCallback(target_prompts=["Tom has 3 apples and 4 pears.", "12 + 7 = 19"],
                                        distractor_prompts=["Hello, how are you?", "The tower is in Paris."],
                                        batch_size=2)
    prune = SelectivityPruneCallback(0.5, multiple_of=64, plan_path=str(tmp_path / "plan.json"))
    trainer = _trainer([capture, prune], tmp_path)
    trainer.fit(module, train_dataloaders=data)
    assert module.model.config.intermediate_size == 128
    assert all(b.width == 128 for b in find_swiglu_mlps(module.model))
    # The optimizer was built after slicing: it holds exactly the sliced model's parameters.
    assert {id(p) for p in trainer.optimizers[0].param_groups[0]["params"]} == {id(p) for p in module.parameters()}
    assert PrunePlan.load(tmp_path / "plan.json").kept_indices == prune.plan.kept_indices
    assert int(capture.stats.count("target")) == 2


def test_capture_errors(tmp_path):
    with pytest.raises(ValueError, match="`target_prompts` is empty"):
        ActivationCaptureCallback(target_prompts=[])
    with pytest.raises(ValueError, match="`aggregation`"):
        ActivationCaptureCallback(aggregation="mean")
    with pytest.raises(ValueError, match=r"`ratio`.*\(0, 1\); got 1.5"):
        SelectivityPruneCallback(1.5)
    with pytest.raises(ValueError, match="`criterion` must be one of"):
        SelectivityPruneCallback(0.2, mode="wanda")
    with pytest.raises(ValueError, match="`multiple_of`"):
        SelectivityPruneCallback(0.2, multiple_of=0)


def test_multiple_of_larger_than_width_is_named(tmp_path, tiny_dir):
    module = PrunableCausalLM(tiny_dir)
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=512)], tmp_path)
    with pytest.raises(ValueError, match=r"`multiple_of` must be an integer in \[1, d_ff=256\]; got 512"):
        trainer.fit(module, datamodule=_datamodule())


def test_tokenizer_without_pad_token_is_handled(tmp_path):
    model, tokenizer = make_tiny_model()
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    module = PrunableCausalLM(str(tmp_path / "m"))
    assert module.tokenizer.pad_token == module.tokenizer.eos_token


def test_lora_bad_inputs(tiny_dir):
    with pytest.raises(ValueError, match=r"`lora.r` \(rank\) must be a positive integer; got 0"):
        LoraSettings(r=0)
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no nn.Linear.*'down_proj'.*'q_proj'"):
        module.configure_model()


def test_cli_fit_exports_a_plain_checkpoint_with_identical_logits(tmp_path, tiny_dir):
    export = tmp_path / "export"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={tiny_dir}",
                    f"--model.export_dir={export}", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false", f"--data.target={GSM8K}",
                    f"--data.distractors=[{SQUAD}, {DIALOG}]", f"--data.finetune={GSM8K}"])
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    merged = cli.model.model.eval()
    assert not cli.model.is_lora_wrapped and reloaded.config.intermediate_size == 192
    input_ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, merged(input_ids).logits, rtol=0, atol=0)
    plan = PrunePlan.load(export)
    card = json.loads((export / "lit_prune.json").read_text())
    assert card["pruning"]["exact_ratio"] == plan.exact_ratio == 0.25
    assert card["pruning"]["provenance"]["target_hash"] and card["versions"]["torch"]
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_failed_export_leaves_nothing_behind(tmp_path, tiny_dir, monkeypatch):
    module = PrunableCausalLM(tiny_dir)
    target = tmp_path / "out"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module.tokenizer, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        module.export(target)
    assert list(tmp_path.iterdir()) == []


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_recovery_loss_goes_down(tmp_path, tiny_dir, equal_length_data):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=8, alpha=16, dropout=0.0), learning_rate=1e-2)
    recorder = LossRecorder()
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=32), recorder],
                       tmp_path, max_steps=24)
    trainer.fit(module, datamodule=_datamodule(finetune=equal_length_data, finetune_samples=None, val_samples=0))
    first, last = sum(recorder.losses[:4]) / 4, sum(recorder.losses[-4:]) / 4
    assert last < first - 0.4, recorder.losses  # measured: 5.61 -> 4.99 over 24 steps


class LearningRateRecorder(Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_schedule_warms_up_then_decays_to_the_floor(tmp_path, tiny_dir, equal_length_data):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                              warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    recorder = LearningRateRecorder()
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=32), recorder],
                       tmp_path, max_steps=10)
    trainer.fit(module, datamodule=_datamodule(finetune=equal_length_data, finetune_samples=None, val_samples=0))
    rates = recorder.rates
    assert len(rates) == 10
    assert rates[:3] == pytest.approx([5e-3, 1e-2, 1e-2])  # linear warm-up, then the peak
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # strictly decreasing after the peak
    assert rates[-1] == pytest.approx(1e-3)  # min_lr_ratio * learning_rate on the last step


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr_schedule": "linear"}, r"`lr_schedule` must be one of \('constant', 'cosine'\); got 'linear'"),
    ({"min_lr_ratio": 1.5}, r"`min_lr_ratio` must be in \[0, 1\]; got 1.5"),
])
def test_schedule_bad_inputs(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunableCausalLM(tiny_dir, **kwargs)


def test_cosine_schedule_needs_a_finite_run(tmp_path, tiny_dir, equal_length_data):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), lr_schedule="cosine")
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=32)], tmp_path,
                       max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match=r"`lr_schedule='cosine'` needs a finite run"):
        trainer.fit(module, datamodule=_datamodule(finetune=equal_length_data, finetune_samples=None, val_samples=0))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_recovery_runs_on_cpu(tmp_path, tiny_dir, equal_length_data, precision):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=32)], tmp_path,
                       precision=precision)
    trainer.fit(module, datamodule=_datamodule(finetune=equal_length_data, finetune_samples=None, val_samples=0))
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert next(p for n, p in module.named_parameters() if "lora_A" in n).dtype == expected


def _resume_run(tmp_path, tiny_dir, data, max_steps, ckpt_path=None, ratio=0.25):
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=5e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    capture = ActivationCaptureCallback()
    trainer = _trainer([capture, SelectivityPruneCallback(ratio, multiple_of=32), checkpoint], tmp_path,
                       max_steps=max_steps, enable_checkpointing=True)
    if ckpt_path:
        trainer.ckpt_path = ckpt_path
    L.seed_everything(0)
    trainer.fit(module, datamodule=_datamodule(finetune=data, finetune_samples=None, val_samples=0, batch_size=8))
    return module, capture, trainer


def test_resume_equals_uninterrupted_run(tmp_path, tiny_dir, equal_length_data):
    # 32 rows / batch 8 = 4 steps per epoch; interrupt at the epoch boundary after step 4, go on to 8.
    full, _, _ = _resume_run(tmp_path / "full", tiny_dir, equal_length_data, max_steps=8)
    _, _, first = _resume_run(tmp_path / "part", tiny_dir, equal_length_data, max_steps=4)
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    resumed, capture, trainer = _resume_run(tmp_path / "resumed", tiny_dir, equal_length_data, max_steps=8,
                                            ckpt_path=str(last))
    assert capture.stats is None  # the plan came from the checkpoint: no capture again
    assert trainer.global_step == 8
    assert resumed.prune_plan.kept_indices == full.prune_plan.kept_indices
    expected, got = _adapters(full), _adapters(resumed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_resume_with_a_different_plan_names_both(tmp_path, tiny_dir, equal_length_data):
    _resume_run(tmp_path / "part", tiny_dir, equal_length_data, max_steps=1)
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = _trainer([ActivationCaptureCallback(), SelectivityPruneCallback(0.5, multiple_of=32)], tmp_path,
                       max_steps=2)
    with pytest.raises(ValueError, match=r"ratio 0.25, kept width 192 of 256.*ratio 0.5 kept width 128"):
        trainer.fit(module, datamodule=_datamodule(finetune=equal_length_data, val_samples=0), ckpt_path=last)


class SGDRecovery(PrunableCausalLM):
    """Plain SGD for the DDP comparison: Adam's first steps are ~lr * sign(grad), which turns float noise
    in near-zero gradients (the all-reduce sums in another order) into +-lr differences."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.learning_rate)


def _ddp_run(tmp_path, tiny_dir, data, devices, batch_size):
    stats_path, plan_path = tmp_path / "stats.pt", tmp_path / "plan.json"
    module = SGDRecovery(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=0.5,
                              export_dir=str(tmp_path / "export"), merge_on_export=False)
    trainer = _trainer(
        [ActivationCaptureCallback(batch_size=3, stats_path=str(stats_path), progress=False),
         SelectivityPruneCallback(0.25, multiple_of=32, plan_path=str(plan_path))],
        tmp_path, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=3)
    L.seed_everything(0)  # LoRA's A matrices are random; spawned ranks re-seed from PL_GLOBAL_SEED
    # seed 0: the one-process EpochShuffleSampler draws the permutation Lightning's DistributedSampler draws.
    trainer.fit(module, datamodule=_datamodule(finetune=data, finetune_samples=None, val_samples=0,
                                               batch_size=batch_size, seed=0))
    adapters = {}
    from safetensors.torch import load_file

    for name, tensor in load_file(tmp_path / "export" / "adapter_model.safetensors").items():
        adapters[name] = tensor
    return NeuronStats.load(stats_path), PrunePlan.load(plan_path), adapters


def _capture_with_cache(tmp_path, model_dir, stats_path, **callback_kwargs):
    module = PrunableCausalLM(model_dir)
    capture = ActivationCaptureCallback(target_prompts=["What is 2 plus 3?", "Tom has 4 apples and eats 1."],
                                        distractor_prompts=["Hello, how are you?", "Where is the station?"],
                                        batch_size=4, stats_path=str(stats_path), progress=False, **callback_kwargs)
    trainer = _trainer([capture], tmp_path, max_steps=1)
    trainer.strategy.connect(module)
    stats = capture.ensure_stats(trainer, module)
    return stats, module


def test_cached_statistics_are_reused_only_for_the_same_weights_and_prompts(tmp_path, tiny_dir):
    stats_path = tmp_path / "stats.pt"
    first, module = _capture_with_cache(tmp_path, tiny_dir, stats_path)
    assert first.metadata["model_fingerprint"] == model_fingerprint(module.model)
    saved = stats_path.stat().st_mtime_ns
    again, _ = _capture_with_cache(tmp_path, tiny_dir, stats_path)  # same weights and prompts: loaded
    assert stats_path.stat().st_mtime_ns == saved
    torch.testing.assert_close(again["target.abs_sum"], first["target.abs_sum"], rtol=0, atol=0)

    # The same folder retrained in place: other weights under the same path.
    retrained = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for block in find_swiglu_mlps(retrained):
            block.up_proj.weight.mul_(1.5)
    retrained.save_pretrained(tmp_path / "retrained")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "retrained")
    import shutil

    shutil.copy(stats_path, tmp_path / "stale.pt")
    with pytest.warns(UserWarning, match=r"captured on other weights .*capturing again"):
        fresh, module = _capture_with_cache(tmp_path, str(tmp_path / "retrained"), tmp_path / "stale.pt")
    assert fresh.metadata["model_fingerprint"] == model_fingerprint(module.model) != first.metadata["model_fingerprint"]
    assert not torch.equal(fresh["target.abs_sum"], first["target.abs_sum"])
    assert NeuronStats.load(tmp_path / "stale.pt").metadata["model_fingerprint"] == fresh.metadata["model_fingerprint"]

    shutil.copy(stats_path, tmp_path / "other-tokens.pt")
    with pytest.warns(UserWarning, match=r"captured on prompt tokens, this run asks for response"):
        _capture_with_cache(tmp_path, tiny_dir, tmp_path / "other-tokens.pt", capture="response")
    shutil.copy(stats_path, tmp_path / "no-gram.pt")
    with pytest.warns(UserWarning, match=r"hold no gram statistics"):
        again, _ = _capture_with_cache(tmp_path, tiny_dir, tmp_path / "no-gram.pt", gram=True)
    assert again.has_gram
    # A torn cache file is captured again (with a warning that names it), not a bare EOFError.
    (tmp_path / "torn.pt").write_bytes(stats_path.read_bytes()[:64])
    with pytest.warns(UserWarning, match=r"torn.pt.*cannot be read.*capturing again"):
        _capture_with_cache(tmp_path, tiny_dir, tmp_path / "torn.pt")


def test_reference_outputs_key_names_the_weights(tmp_path, tiny_dir):
    dense = PrunableCausalLM(tiny_dir)
    key = dense.evaluator.reference_key(dense, "qna")
    assert key["weights"] == model_fingerprint(dense.model)
    with torch.no_grad():
        next(dense.model.parameters()).add_(1.0)
    again = PrunableCausalLM(tiny_dir)
    assert again.evaluator.reference_key(again, "qna") == key  # same folder, same weights
    changed = PrunableCausalLM(tiny_dir)
    with torch.no_grad():
        next(changed.model.parameters()).add_(1.0)
    assert changed.evaluator.reference_key(changed, "qna")["weights"] != key["weights"]
    # A pruned model is compared with the weights its plan was made from.
    stats, module = _capture_with_cache(tmp_path, tiny_dir, tmp_path / "stats.pt")
    plan = make_plan(module.model, stats, PruneSpec(0.25, "selective", multiple_of=32, capture="prompt")).plan
    plan.apply(module.model)
    module.set_prune_plan(plan)
    assert module.evaluator.reference_key(module, "qna")["weights"] == key["weights"]


@pytest.mark.slow
def test_ddp_spawn_matches_one_process(tmp_path, tiny_dir, equal_length_data):
    one_stats, one_plan, one_adapters = _ddp_run(tmp_path / "one", tiny_dir, equal_length_data, 1, 4)
    two_stats, two_plan, two_adapters = _ddp_run(tmp_path / "two", tiny_dir, equal_length_data, 2, 2)
    assert int(two_stats.count("target")) == int(one_stats.count("target")) == 12
    for a, b in zip(one_stats.tensors(), two_stats.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (selectivity(one_stats) - selectivity(two_stats)).abs().max() < 1e-4
    assert one_plan.kept_indices == two_plan.kept_indices
    # Same global batch (rank r takes rows r::2 of the permutation) and equal token counts per row, so the
    # mean of the per-rank mean losses equals the one-process mean and the adapter updates agree.
    assert one_adapters.keys() == two_adapters.keys()
    for name in one_adapters:
        torch.testing.assert_close(two_adapters[name], one_adapters[name], rtol=1e-4, atol=1e-5)


def test_prune_only_then_recovery_only(tmp_path, tiny_dir):
    common = [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              f"--data.target={GSM8K}", f"--data.distractors=[{SQUAD}, {DIALOG}]"]
    pruned = tmp_path / "pruned"
    cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config",
              str(ROOT / "configs" / "prune-only-tiny.yaml"), f"--model.model_name_or_path={tiny_dir}",
              f"--model.export_dir={pruned}", *common])
    assert AutoModelForCausalLM.from_pretrained(pruned).config.intermediate_size == 192
    recovered = tmp_path / "recovered"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={pruned}",
                    "--trainer.callbacks=null", f"--model.export_dir={recovered}", f"--data.finetune={GSM8K}",
                    *common])
    assert cli.trainer.global_step == 4
    card = json.loads((recovered / "lit_prune.json").read_text())
    assert card["pruning"]["kept_width"] == 192 and card["lora"]["r"] == 4  # the plan's provenance survives


def _resume_cli(tmp_path, tiny_dir, max_steps, *extra):
    """`python -m lit_prune fit` on the tiny config with last-checkpointing into tmp_path/ckpt."""
    config = tmp_path / "resume.yaml"
    config.write_text(f"""
trainer:
  max_steps: {max_steps}
  enable_checkpointing: true
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lit_prune.callbacks.ActivationCaptureCallback
      init_args: {{batch_size: 8, max_length: 128, progress: false}}
    - class_path: lit_prune.callbacks.SelectivityPruneCallback
      init_args: {{ratio: 0.25, multiple_of: 32}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / 'ckpt'}, save_last: true, every_n_train_steps: 1}}
model:
  export_dir: null
data:
  target: {GSM8K}
  distractors: [{SQUAD}, {DIALOG}]
  finetune: {GSM8K}
  val_samples: 0
""")
    return cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(config),
                     f"--model.model_name_or_path={tiny_dir}", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["last", "path"])
def test_every_cli_resume_spelling_replays_the_plan_without_capturing(tmp_path, tiny_dir, spelling):
    first = _resume_cli(tmp_path, tiny_dir, 2)
    plan = first.model.prune_plan
    assert plan.criterion == "compensated" and plan.refit
    ckpt = "last" if spelling == "last" else str(tmp_path / "ckpt" / "last.ckpt")
    resumed = _resume_cli(tmp_path, tiny_dir, 4, f"--ckpt_path={ckpt}")
    capture = next(c for c in resumed.trainer.callbacks if isinstance(c, ActivationCaptureCallback))
    assert capture.stats is None  # replayed from the checkpoint: no capture
    assert resumed.trainer.global_step == 4
    assert resumed.model.prune_plan.kept_indices == plan.kept_indices
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["lit_prune"]) == {"plan"}  # one key, one copy of the plan
    assert not any("plan" in str(v) for v in checkpoint.get("callbacks", {}).values())


def test_a_missing_resume_checkpoint_fails_before_capture(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match=r"`ckpt_path`='.*nope.ckpt' does not exist"):
        _resume_cli(tmp_path, tiny_dir, 2, f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert not (tmp_path / "ckpt").exists()


def test_an_already_pruned_export_is_not_pruned_again_silently(tmp_path, tiny_dir):
    pruned = tmp_path / "pruned"
    cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config",
              str(ROOT / "configs" / "prune-only-tiny.yaml"), f"--model.model_name_or_path={tiny_dir}",
              f"--model.export_dir={pruned}", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", f"--data.target={GSM8K}", f"--data.distractors=[{SQUAD}, {DIALOG}]"])
    with pytest.raises(ValueError, match=r"already pruned \(compensated, kept width 192 of 256.*callbacks null"):
        cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config",
                  str(ROOT / "configs" / "prune-only-tiny.yaml"), f"--model.model_name_or_path={pruned}",
                  f"--model.export_dir={tmp_path / 'again'}", f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.enable_progress_bar=false",
                  f"--data.target={GSM8K}", f"--data.distractors=[{SQUAD}, {DIALOG}]"])


def test_stats_path_of_other_weights_is_refused(tmp_path, tiny_dir):
    stats, _ = _capture_with_cache(tmp_path, tiny_dir, tmp_path / "stats.pt")
    save_tiny_model(tmp_path / "other", seed=7)
    module = PrunableCausalLM(str(tmp_path / "other"))
    trainer = _trainer([SelectivityPruneCallback(0.25, "selective", multiple_of=32, stats_path=str(tmp_path / "stats.pt"))],
                       tmp_path)
    trainer.strategy.connect(module)
    with pytest.raises(ValueError, match=r"`stats_path`=.*other weights"):
        trainer.callbacks[0].prune(trainer, module)


def _a_file(folder):
    path = folder / "not-a-folder"
    path.write_text("x")
    return path


@pytest.mark.parametrize(("make", "match"), [
    (lambda tmp: ActivationCaptureCallback("What is 2 plus 3?", ["Hello"]), r"`target_prompts` must be a list"),
    (lambda tmp: ActivationCaptureCallback(["a"], ["b"], target_responses=["x", "y"]), "one response per"),
    (lambda tmp: ActivationCaptureCallback(stats_path=str(tmp)), r"`stats_path`=.* is a directory"),
    (lambda tmp: SelectivityPruneCallback(0.2, seed=None), "`seed`"),
    (lambda tmp: SelectivityPruneCallback(0.2, seed="abc"), "`seed`"),
    (lambda tmp: SelectivityPruneCallback(0.2, criterion="compensated", mode="selective"), "disagree"),
    (lambda tmp: SelectivityPruneCallback(0.2, plan_path=str(_a_file(tmp) / "plan.json")),
     r"`plan_path`=.*cannot be written"),
])
def test_bad_callback_arguments_fail_when_built(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path)


def test_bad_settings_fail_before_capture(tmp_path, tiny_dir):
    module = PrunableCausalLM(tiny_dir)
    capture = ActivationCaptureCallback(target_prompts=["a b c"], distractor_prompts=["d e f"])
    for prune, match in ((SelectivityPruneCallback(0.25, multiple_of=512), r"`multiple_of`.*d_ff=256.*512"),
                         (SelectivityPruneCallback(0.25, "taylor", multiple_of=32), None)):
        trainer = _trainer([ActivationCaptureCallback(target_prompts=["a b c"], distractor_prompts=["d e f"],
                                                      gradients=False), prune], tmp_path)
        trainer.strategy.connect(module)
        with pytest.raises(ValueError, match=match or r"gradients=False\) but \['taylor'\] need"):
            trainer.callbacks[0].ensure_stats(trainer, module)
        assert trainer.callbacks[0].stats is None
    del capture


def test_a_foreign_prune_plan_in_a_dense_folder_is_refused(tmp_path, tiny_dir):
    import shutil

    stats, module = _capture_with_cache(tmp_path, tiny_dir, tmp_path / "stats.pt")
    plan = make_plan(module.model, stats, PruneSpec(0.25, "selective", multiple_of=32, capture="prompt")).plan
    dense = tmp_path / "dense"
    shutil.copytree(tiny_dir, dense)
    plan.save(dense)
    with pytest.raises(ValueError, match=r"prune_plan.json' says the model keeps 192 of 256.*width \[256\]"):
        PrunableCausalLM(str(dense))
