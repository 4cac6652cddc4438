"""The sweep and demo subcommands run end to end on the tiny model and their numbers are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_prune.cli import cli_main
from lit_prune.pruning import kept_width
from lit_prune.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _data_args():
    return [f"--data.target={SHARED / 'gsm8k' / 'train.jsonl'}",
            f"--data.distractors=[{SHARED / 'squad' / 'small-v2.json'}, {SHARED / 'dailydialog' / 'validation.txt'}]",
            f"--data.finetune={SHARED / 'gsm8k' / 'train.jsonl'}", f"--data.eval_math={SHARED / 'gsm8k' / 'test.jsonl'}",
            f"--data.eval_qna={SHARED / 'squad' / 'small-v2.json'}", "--data.eval_dialogue=null", "--data.eval_code=null",
            "--data.eval_samples=2", "--data.capture_samples=8", "--trainer.enable_progress_bar=false"]


def test_sweep_report_is_consistent_with_the_planner(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "sweep"
    cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
              f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--ratios=[0.25, 0.5]",
              "--modes=[selective, random]", "--random_seeds=[42]", "--recover_modes=[selective]",
              "--aggregations=[prompt]", "--recovery_steps=1", f"--report_dir={out}"])
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["runs"]) == 4
    for run in summary["runs"]:
        assert run["kept_width"] == kept_width(256, run["ratio"], 32) == run["pruned"]["mlp_width"]
        assert run["pruned"]["parameters"] < summary["dense"]["parameters"]
        assert ("recovered" in run) == (run["criterion"] == "selective")
    report = (out / "report.md").read_text()
    assert "| 25% | 192 | 25.00% |" in report and "| 50% | 128 | 50.00% |" in report
    for figure in ("fig1_relative_accuracy_loss", "fig3_selective_vs_random", "fig6_layerwise_selectivity"):
        assert (out / f"{figure}.png").stat().st_size > 1000 and f"{figure}.png" in report
    assert (tmp_path / "sweep" / "stats-prompt.pt").is_file()  # a second sweep re-slices without capturing


def test_sweep_rejects_bad_arguments(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    with pytest.raises(ValueError, match="`modes`/`recover_modes` entries must be in"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--modes=[magnitude]"])
