"""A run killed in the middle of an epoch and resumed from its checkpoint ends with the weights of an
uninterrupted run: the fine-tune loader saves its position (``ResumableDataLoader``) and resumes at the next batch."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback
from lit_prune.data import PruneDataModule
from lit_prune.data.datamodule import EpochShuffleSampler, ResumableDataLoader
from lit_prune.module import LoraSettings, PrunableCausalLM
from conftest import DIALOG, GSM8K, SQUAD

STEPS_PER_EPOCH = 4  # 32 rows, batch 8
TOTAL_STEPS = 7


@pytest.fixture(scope="module")
def sums_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with path.open("w") as handle:
        for i in range(32):
            a, b = 10 + i, 20 + (i * 7) % 38
            handle.write(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"\\boxed{{{a + b}}}"}) + "\n")
    return str(path)


class BatchRecorder(L.Callback):
    """The token ids of every training batch, to compare the order of the data."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].tolist())


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    """Crash the run as it starts optimizer step ``step`` (after the checkpoint of the step before was saved)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"killed before step {self.step}")


def _run(root, tiny_dir, data, crash_at=None, ckpt_path=None, lr_schedule="constant", max_epochs=None):
    """Fit for TOTAL_STEPS (or ``max_epochs``), crashing at step ``crash_at``, resuming from ``ckpt_path``."""
    module = PrunableCausalLM(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=5e-3,
                              lr_schedule=lr_schedule)
    recorder = BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=-1 if max_epochs else TOTAL_STEPS, max_epochs=max_epochs,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[ActivationCaptureCallback(), SelectivityPruneCallback(0.25, multiple_of=32), recorder,
                   ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)]
        + ([CrashAt(crash_at)] if crash_at else []))
    if ckpt_path:
        trainer.ckpt_path = ckpt_path
    L.seed_everything(0)
    datamodule = PruneDataModule(target=GSM8K, distractors=[SQUAD, DIALOG], capture_samples=12, finetune=data,
                                 val_samples=0, max_length=512, batch_size=8)
    if crash_at:
        with pytest.raises(Crash):
            trainer.fit(module, datamodule=datamodule)
    else:
        trainer.fit(module, datamodule=datamodule)
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
    return adapters, recorder.batches, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir, sums_data):
    runs = {}

    def run(lr_schedule, max_epochs):
        if (lr_schedule, max_epochs) not in runs:
            runs[lr_schedule, max_epochs] = _run(tmp_path_factory.mktemp("full"), tiny_dir, sums_data,
                                                 lr_schedule=lr_schedule, max_epochs=max_epochs)
        return runs[lr_schedule, max_epochs]

    return run


@pytest.mark.parametrize(("interrupt_at", "lr_schedule", "max_epochs"), [
    (2, "constant", None),  # in the middle of epoch 0
    pytest.param(5, "constant", None, marks=pytest.mark.slow),  # in the middle of epoch 1
    # A cosine schedule over `max_epochs` reads `trainer.estimated_stepping_batches`, which builds the loader before
    # the fit loop is restored, so Lightning never loads the loaders' states (Lightning #20550): the
    # datamodule's copy of the position must do it.
    pytest.param(2, "cosine", 2, marks=pytest.mark.slow),
])
def test_midepoch_resume_equals_uninterrupted_run(tmp_path, tiny_dir, sums_data, uninterrupted, interrupt_at,
                                                  lr_schedule, max_epochs):
    expected, full_batches, _ = uninterrupted(lr_schedule, max_epochs)
    _, first_batches, _ = _run(tmp_path / "part", tiny_dir, sums_data, crash_at=interrupt_at, lr_schedule=lr_schedule,
                               max_epochs=max_epochs)
    checkpoint = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["epoch"] == interrupt_at // STEPS_PER_EPOCH
    assert loader_state["start"] == 8 * (interrupt_at % STEPS_PER_EPOCH)  # the next batch, not the next epoch

    assert checkpoint["PruneDataModule"]["train_loader"] == loader_state
    got, resumed_batches, trainer = _run(tmp_path / "resumed", tiny_dir, sums_data,
                                         ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"),
                                         lr_schedule=lr_schedule, max_epochs=max_epochs)
    assert trainer.global_step == len(full_batches) == (max_epochs * STEPS_PER_EPOCH if max_epochs else TOTAL_STEPS)
    assert len(first_batches) == interrupt_at + 1  # the batch it crashed on is trained again after the resume
    assert first_batches[:interrupt_at] + resumed_batches == full_batches  # no batch repeated or skipped
    assert len({str(b) for b in full_batches[:STEPS_PER_EPOCH]}) == STEPS_PER_EPOCH  # the batches differ
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_sampler_resumes_mid_epoch_and_only_for_its_epoch():
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    loader = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochShuffleSampler(10, seed=3))
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 2, "start": 4, "seed": 3, "length": 10, "shuffle": True}

    resumed = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochShuffleSampler(10, seed=3))
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch again after loading the state
    assert [int(i) for batch in resumed for i in batch] == order[4:]
    next(iter(resumed))
    assert resumed.state_dict()["start"] == 4  # a pass from the start of the epoch counts from 0 again
    assert list(resumed.sampler) == order  # the saved position is used once

    resumed.sampler.set_epoch(3)  # a checkpoint between the next epoch's start and its first batch
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["start"] == 0

    moved_on = EpochShuffleSampler(10, seed=3)
    moved_on.load_state_dict(state)
    moved_on.set_epoch(3)  # saved at the end of epoch 2, resumed in epoch 3: a full epoch
    assert len(list(moved_on)) == 10

    other_data = EpochShuffleSampler(12, seed=3)
    other_data.load_state_dict(state)  # another data set: the state does not fit and is ignored
    other_data.set_epoch(2)
    assert len(list(other_data)) == 12
