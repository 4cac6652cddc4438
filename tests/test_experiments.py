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


@pytest.mark.slow
def test_sweep_report_is_consistent_with_the_planner(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "sweep"
    cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
              f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--ratios=[0.25, 0.5]",
              "--criteria=[compensated, random, taylor]", "--refit_criteria=[wanda_sp]", "--random_seeds=[42]",
              "--recover=[compensated, selective/paper]", "--recovery_steps=1", f"--report_dir={out}"])
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["runs"]) == 10  # (3 criteria + 1 re-fit + the paper's) x 2 ratios
    assert {r["mode"] for r in summary["runs"]} == {"compensated", "random/seed42", "taylor", "wanda_sp+refit",
                                                     "selective/paper"}
    for run in summary["runs"]:
        assert run["kept_width"] == kept_width(256, run["ratio"], 32) == run["pruned"]["mlp_width"]
        assert run["pruned"]["parameters"] < summary["dense"]["parameters"]
        assert ("recovered" in run) == (run["mode"] in ("compensated", "selective/paper"))
        assert run["refit"] == (run["mode"] in ("compensated", "wanda_sp+refit"))
        assert run["capture"] == ("prompt" if run["mode"] == "selective/paper" else "response")
    report = (out / "report.md").read_text()
    assert "| 25% | 192 | 25.00% |" in report and "| 50% | 128 | 50.00% |" in report
    assert "## Criteria" in report and "| wanda_sp+refit |" in report
    for figure in ("fig1_relative_accuracy_loss", "fig3_selective_vs_random", "fig6_layerwise_selectivity"):
        assert (out / f"{figure}.png").stat().st_size > 1000 and f"{figure}.png" in report
    # One capture per capture setting, each holding what its criteria need; a second sweep re-slices without them.
    from lit_prune.pruning import NeuronStats

    response = NeuronStats.load(tmp_path / "sweep" / "stats-response.pt")
    assert response.statistics == {"gram", "gradients"}
    assert NeuronStats.load(tmp_path / "sweep" / "stats-prompt.pt").statistics == frozenset()


def test_sweep_rejects_bad_arguments(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    with pytest.raises(ValueError, match="`criteria`/`refit_criteria` entries must be in"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[wanda]"])
    with pytest.raises(ValueError, match=r"`recover` names \['selective'\]"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[random]",
                  "--recover=[selective]"])


def test_findings_name_the_peers_that_beat_the_default():
    from lit_prune.sweep_report import _default_findings

    def run(mode, ratio, pruned, recovered=None):
        return {"mode": mode, "ratio": ratio, "pruned": {"exact_match": pruned},
                **({"recovered": {"exact_match": recovered}} if recovered is not None else {})}

    summary = {"default_criterion": "compensated", "runs": [
        run("compensated", 0.25, 0.9, 0.95), run("wanda_sp", 0.25, 0.8, 0.97), run("magnitude", 0.25, 0.7),
        run("compensated", 0.5, 0.6), run("wanda_sp", 0.5, 0.7), run("flap", 0.5, 0.65)]}
    lines = _default_findings(summary, "exact_match")
    assert lines[0] == ("The default criterion `compensated` was **beaten after pruning** at 50% (2 variant(s), best "
                        "wanda_sp 70.0 vs 60.0).")
    assert "beaten after LoRA recovery** at 25% (1 variant(s), best wanda_sp 97.0 vs 95.0)" in lines[1]
