"""Exports never delete user data, fail before any work when they would, and swap in atomically (real SIGKILLs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from transformers import AutoModelForCausalLM

from lit_prune.callbacks import ActivationCaptureCallback, SelectivityPruneCallback
from lit_prune.data import PruneDataModule
from lit_prune.io import (
    MARKER_FILENAME,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale,
    is_export,
    replace_directory,
    write_export_marker,
)
from lit_prune.module import PrunableCausalLM
from lit_prune.eval.report import write_json, write_jsonl

from conftest import DIALOG, GSM8K, SQUAD


@pytest.fixture(scope="module")
def module(tiny_dir):
    return PrunableCausalLM(tiny_dir)


class HookRecorder(L.Callback):
    def __init__(self):
        self.calls = []

    def setup(self, trainer, pl_module, stage):
        self.calls.append("setup")


def _fit(module, root, recorder=None):
    """A pruning run; returns the capture callback, to see whether it captured."""
    capture = ActivationCaptureCallback(progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[recorder or HookRecorder(), capture, SelectivityPruneCallback(0.25, multiple_of=32)])
    trainer.fit(module, datamodule=PruneDataModule(target=GSM8K, distractors=[SQUAD, DIALOG], capture_samples=4))
    return capture


def _run_name(folder: Path, model: bool = True) -> str:
    """Assert ``folder`` holds one complete export (marker, every listed file, loadable); return its ``run``."""
    assert is_export(folder), sorted(p.name for p in folder.iterdir()) if folder.is_dir() else folder
    card = json.loads((folder / MARKER_FILENAME).read_text())
    assert all((folder / name).is_file() for name in card["lit_prune_export"]["files"])
    if model:
        AutoModelForCausalLM.from_pretrained(folder)
    else:
        assert (folder / "weights.bin").read_bytes() == card["run"].encode() * 200_000
    return card["run"]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_export_dir_overlapping_the_source_model_is_refused_at_construction(tiny_dir, where):
    export = {"same": tiny_dir, "inside": f"{tiny_dir}/export", "contains": str(Path(tiny_dir).parent)}[where]
    relation = {"same": "is", "inside": "is inside", "contains": "contains"}[where]
    with pytest.raises(ValueError, match=rf"`model.export_dir`='{export}' {relation} the folder of "
                                         rf"`model.model_name_or_path`.*model.export_overwrite=True"):
        PrunableCausalLM(tiny_dir, export_dir=export)
    assert PrunableCausalLM(tiny_dir, export_dir=export, export_overwrite=True).export_dir == export


def test_export_dir_with_user_files_is_refused_before_capture(tmp_path, tiny_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    recorder = HookRecorder()
    with pytest.raises(ValueError, match=r"`model.export_dir`='.*mine' is a folder that lit_prune did not write.*"
                                         r"must be a new folder or a previous lit_prune export.*export_overwrite"):
        _fit(PrunableCausalLM(tiny_dir, export_dir=str(mine)), tmp_path / "run", recorder)
    assert recorder.calls == []  # before every callback's setup, so before the capture
    assert (mine / "notes.txt").read_text() == "keep me"


def test_user_file_inside_a_previous_export_is_refused_at_export(tmp_path, module):
    export = tmp_path / "export"
    module.export(export, extra_card={"run": "first"})
    (export / "eval_notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"holds a lit_prune export plus files it did not write \(eval_notes.md\)"):
        module.export(export, extra_card={"run": "second"})
    assert (export / "eval_notes.md").read_text() == "mine"
    assert json.loads((export / MARKER_FILENAME).read_text())["run"] == "first"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "contains"])
def test_export_dir_that_is_or_contains_the_run_folder_is_refused_before_capture(tmp_path, tiny_dir, where):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("trainer: {}\n")
    export = run if where == "same" else tmp_path
    recorder = HookRecorder()
    match = r"`model.export_dir`='.*' (is|contains) `trainer.default_root_dir`='.*run'; replacing it would delete"
    with pytest.raises(ValueError, match=match):
        _fit(PrunableCausalLM(tiny_dir, export_dir=str(export)), run, recorder)
    assert recorder.calls == []
    assert (run / "config.yaml").read_text() == "trainer: {}\n"


def test_unwritable_export_dir_is_refused_before_capture(tmp_path, tiny_dir):
    (tmp_path / "a_file").write_text("")
    recorder = HookRecorder()
    match = r"`model.export_dir`='.*a_file/export' cannot be created: '.*a_file' is a file"
    with pytest.raises(ValueError, match=match):
        _fit(PrunableCausalLM(tiny_dir, export_dir=str(tmp_path / "a_file" / "export")), tmp_path / "run", recorder)
    assert recorder.calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file-as-parent case covers it")
def test_read_only_export_parent_is_refused(tmp_path, tiny_dir):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"is not writable: cannot create files in"):
        _fit(PrunableCausalLM(tiny_dir, export_dir=str(locked / "export")), tmp_path / "run")


def test_previous_and_legacy_exports_are_replaced_and_overwrite_replaces_anything(tmp_path, module):
    export = tmp_path / "export"
    module.export(export, extra_card={"run": "first"})
    module.export(export, extra_card={"run": "second"})
    assert _run_name(export) == "second"
    # An export written before lit_prune.json listed its files: recognised by its card and file names.
    card = json.loads((export / MARKER_FILENAME).read_text())
    del card["lit_prune_export"]
    (export / MARKER_FILENAME).write_text(json.dumps(card))
    module.export(export, extra_card={"run": "third"})
    assert _run_name(export) == "third"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    overwriting = PrunableCausalLM(module.model_name_or_path, export_overwrite=True)
    overwriting.export(foreign, extra_card={"run": "forced"})
    assert _run_name(foreign) == "forced" and not (foreign / "data.bin").exists()
    assert _leftovers(tmp_path) == []


def test_export_files_get_the_users_umask(tmp_path, module):
    previous = os.umask(0o027)
    try:
        module.export(tmp_path / "export", extra_card={"run": "first"})
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "export").iterdir()}
    assert set(modes.values()) == {0o640}, modes  # safetensors and the plan included (mkstemp would give 0o600)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------------------------------------------- killed runs
# The exporter that gets killed: the module's real export, or the same swap (lit_prune.io) around a small payload,
# which starts in a second instead of ten (no torch import).
_EXPORTER = """
import sys
import lit_prune.io

tiny_dir, export, swap, payload = sys.argv[1:]
if swap == "no-exchange":
    lit_prune.io._RENAMEAT2 = None  # as on a filesystem without renameat2(RENAME_EXCHANGE)
if payload == "model":
    from lit_prune.module import PrunableCausalLM

    PrunableCausalLM(tiny_dir).export(export, extra_card={"run": "second"})
else:
    with lit_prune.io.replace_directory(export, argument="export") as tmp:
        (tmp / "weights.bin").write_bytes(b"second" * 200_000)
        lit_prune.io.write_export_marker(tmp, {"run": "second"})
"""


def _small_export(export: Path, run: str) -> None:
    with replace_directory(export, argument="export") as tmp:
        (tmp / "weights.bin").write_bytes(run.encode() * 200_000)
        write_export_marker(tmp, {"run": run})


def _export_until(step: str, tiny_dir: str, export: Path, swap: str = "exchange",
                  payload: str = "small") -> subprocess.Popen:
    """Start an export in a new process and return it once it is paused at ``step`` (still alive)."""
    process = subprocess.Popen([sys.executable, "-c", _EXPORTER, tiny_dir, str(export), swap, payload],
                               env={**os.environ, "LIT_PRUNE_IO_PAUSE": step, "PYTHONWARNINGS": "ignore"},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.strip() == f"lit_prune.io paused at {step}":
            return process
    process.wait()
    raise AssertionError(f"the export never reached {step!r} (exit status {process.returncode})")


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stdout.close()


@pytest.mark.parametrize(("step", "swap", "right_after_kill"), [
    ("created", "exchange", "first"),   # the new folder exists, nothing written
    ("written", "exchange", "first"),   # the new export is complete, not yet swapped in
    ("swapped", "exchange", "second"),  # swapped in; the previous export waits to be deleted
    ("moved-old", "no-exchange", None),  # fallback without RENAME_EXCHANGE, killed between its two renames
])
def test_sigkill_at_every_step_leaves_a_complete_export(tmp_path, step, swap, right_after_kill):
    export = tmp_path / "export"
    _small_export(export, "first")
    _kill(_export_until(step, "unused", export, swap))
    if right_after_kill is None:
        assert not export.exists()  # the one gap of the fallback: the next run closes it
    else:
        assert _run_name(export, model=False) == right_after_kill
    assert _leftovers(tmp_path)  # what the killed run left beside the export, with its owner file

    restored = clean_stale(export)
    assert restored and _leftovers(tmp_path) == []
    assert _run_name(export, model=False) == (right_after_kill or "first")
    _small_export(export, "third")
    assert _run_name(export, model=False) == "third" and _leftovers(tmp_path) == []


@pytest.mark.slow  # 9 s (a child process killed mid-export): keeps the fast tier under 2 minutes
def test_sigkill_during_a_model_export_keeps_a_loadable_export(tmp_path, tiny_dir, module):
    export = tmp_path / "export"
    module.export(export, extra_card={"run": "first"})
    _kill(_export_until("swapped", tiny_dir, export, payload="model"))
    assert _run_name(export) == "second"  # loads with from_pretrained
    module.export(export, extra_card={"run": "third"})  # and the next export cleans up after the killed one
    assert _run_name(export) == "third" and _leftovers(tmp_path) == []


def test_a_live_export_and_look_alike_folders_are_left_alone(tmp_path):
    export = tmp_path / "export"
    _small_export(export, "first")
    look_alike = tmp_path / ".export.tmp-1-abcdef01"  # the pattern, but no owner file: not ours to delete
    look_alike.mkdir()
    (look_alike / "precious.txt").write_text("x")
    writer = _export_until("written", "unused", export)
    try:
        _small_export(export, "parallel")  # cleans stale leftovers only
        assert _run_name(export, model=False) == "parallel"
        live = [name for name in _leftovers(tmp_path) if name.startswith(f".export.tmp-{writer.pid}-")]
        assert len(live) == 2  # the live writer's folder and its owner file
    finally:
        _kill(writer)
    _small_export(export, "after")
    assert _leftovers(tmp_path) == [look_alike.name]
    assert (look_alike / "precious.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------------------- files
def test_atomic_writes_replace_whole_files_with_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "a.txt", "one")
        atomic_write_text(path, "two")
        atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
        write_json({"x": 1}, tmp_path / "r.json")
        write_jsonl([{"a": 1}, {"a": 2}], tmp_path / "r.jsonl")
    finally:
        os.umask(previous)
    assert path.read_text() == "two" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1}
    assert (tmp_path / "r.jsonl").read_text().splitlines() == ['{"a": 1}', '{"a": 2}']
    assert {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()} == {0o644}

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_open(path) as handle:
            handle.write("half")
            raise Boom
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_export_marker_lists_the_files_and_nothing_else_counts_as_an_export(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"")
    assert not is_export(folder)
    write_export_marker(folder, {"source_model": "x"})
    assert json.loads((folder / MARKER_FILENAME).read_text())["lit_prune_export"]["files"] == ["config.json",
                                                                                             "sub/w.bin"]
    assert is_export(folder)
    (folder / "extra").mkdir()
    assert not is_export(folder)  # an empty folder it did not write counts too
