"""The sweep and demo subcommands run end to end on the tiny model and their numbers are consistent."""

from __future__ import annotations

import json
import math
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


@pytest.mark.slow
def test_sweep_sets_weight_sparsity_and_depth_beside_width_at_equal_size(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "report"
    cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
              f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--ratios=[0.4, 0.5]",
              "--criteria=[compensated]", "--paper=false", "--sparsity_methods=[magnitude, wanda]",
              "--sparsity_patterns=[unstructured, '2:4']", "--recover=[compensated, sparsity/wanda-2:4]",
              "--recover_ratios=[0.5]", "--recovery_steps=2", f"--report_dir={out}",
              "--depth_criteria=[block_influence, taylor_block]", "--depth_keep_ends=false",
              # short toy problems: the tiny config's max_length (128) would cut every GSM8K response off
              f"--data.target={ROOT / 'checkpoints' / 'toy-math' / 'math_capture.jsonl'}"])
    summary = json.loads((out / "sweep.json").read_text())
    width = {r["ratio"]: r for r in summary["runs"]}
    sparse = {(r["mode"], r["ratio"]): r for r in summary["structure_runs"] if r["structure"] == "sparsity"}
    depth = [r for r in summary["structure_runs"] if r["structure"] == "depth"]
    assert {(r["mode"], r["ratio"]) for r in depth} == {(f"depth/{c}", q) for c in ("block_influence", "taylor_block")
                                                        for q in (0.4, 0.5)}
    for run in depth:  # one of the two blocks removed: fewer parameters, no zeros
        assert len(run["removed_blocks"]) == 1 and run["order"][0] == run["removed_blocks"][0]
        assert run["pruned"]["parameters"] < summary["dense"]["parameters"] and run["pruned"]["zero_parameters"] == 0
        assert run["params_removed"] > 0 and "recovered" not in run
    assert set(sparse) == {("sparsity/magnitude", 0.4), ("sparsity/magnitude", 0.5), ("sparsity/wanda", 0.4),
                           ("sparsity/wanda", 0.5), ("sparsity/magnitude-2:4", 0.5), ("sparsity/wanda-2:4", 0.5)}
    hidden, layers = 64, 2  # the tiny model: 2 layers, hidden 64, d_ff 256
    for (mode, ratio), run in sparse.items():
        removed = 3 * hidden * (256 - kept_width(256, ratio, 32)) * layers
        assert run["measured"]["zeros"] == removed == run["pruned"]["zero_parameters"]  # the same count as width
        assert run["params_removed"] == pytest.approx(width[ratio]["params_removed"], abs=1e-9)
        assert run["pruned"]["parameters"] == summary["dense"]["parameters"]  # zeros, not slices
        assert ("recovered" in run) == (mode == "sparsity/wanda-2:4")
        # Compared with the dense model's outputs, not cached as them: a masked model is not its own reference.
        assert run["pruned"]["sss"] is not None and run["pruned"]["modifications"] == [run["measured"] and
                                                                                       _sparse_label(run)]
    recovered = sparse[("sparsity/wanda-2:4", 0.5)]
    assert recovered["measured_recovered"]["n_m_violations"] == 0
    assert recovered["measured_recovered"]["zeros"] == recovered["measured"]["zeros"]  # LoRA merged, masks held
    assert recovered["recovered"]["sparsity"]["overall"] > 0
    report = (out / "report.md").read_text()
    assert "## Structures at equal size" in report and "| 50.0% | sparsity | sparsity/wanda-2:4 |" in report
    assert f"| 50.0% | depth | depth/block_influence (blocks {depth[0]['removed_blocks']}) |" in report
    assert "fig_structures_equal_size.png" in report and (out / "fig_structures_equal_size.png").stat().st_size > 1000
    assert "The dense model scores 0" in report  # so no structure verdicts (the random model cannot answer)


def _sparse_label(run: dict) -> str:
    from lit_prune.pruning.sparsity import SparsitySpec

    return SparsitySpec(run["method"], run["pattern"], None if ":" in run["pattern"] else run["sparsity"]).label


def test_sweep_rejects_bad_arguments(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    with pytest.raises(ValueError, match="`criteria`/`refit_criteria` entries must be in"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[wanda]"])
    with pytest.raises(ValueError, match=r"`recover` names \['selective'\]"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[random]",
                  "--recover=[selective]"])
    with pytest.raises(ValueError, match="`method` must be one of"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[random]",
                  "--sparsity_methods=[wanda_sp]"])
    with pytest.raises(ValueError, match=r"`criterion` must be one of \('block_influence'"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[random]",
                  "--depth_criteria=[magnitude]"])
    with pytest.raises(ValueError, match="`sparsity_methods` is empty"):
        cli_main(["sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
                  f"--trainer.default_root_dir={tmp_path}", *_data_args(), "--criteria=[random]",
                  "--sparsity_patterns=['2:4']"])


def test_findings_name_the_peers_that_beat_the_default():
    from lit_prune.eval.sweep_report import Metric, _default_findings

    def run(mode, ratio, pruned, recovered=None):
        return {"mode": mode, "ratio": ratio, "pruned": {"exact_match": pruned},
                **({"recovered": {"exact_match": recovered}} if recovered is not None else {})}

    summary = {"default_criterion": "compensated", "runs": [
        run("compensated", 0.25, 0.9, 0.95), run("wanda_sp", 0.25, 0.8, 0.97), run("magnitude", 0.25, 0.7),
        run("compensated", 0.5, 0.6), run("wanda_sp", 0.5, 0.7), run("flap", 0.5, 0.65)]}
    lines = _default_findings(summary, Metric("exact_match"))
    assert lines[0] == ("The default criterion `compensated` was **beaten after pruning** at 50% (2 variant(s), best "
                        "wanda_sp 70.0 vs 60.0).")
    assert "beaten after LoRA recovery** at 25% (1 variant(s), best wanda_sp 97.0 vs 95.0)" in lines[1]


def test_report_ranks_by_target_nll_when_nothing_was_generated(tmp_path):
    """A perplexity-only evaluation (SmolLM2 cannot solve GSM8K): lower NLL is better everywhere in the report."""
    from lit_prune.eval.sweep_report import metric_for, write_sweep_report

    def result(target, distractor):
        return {"nll_target": target, "nll_distractor": distractor, "parameters": 100, "weights_mb": 1.0,
                "peak_memory_mb": 10.0, "decode_tokens_per_s": 5.0}

    def run(mode, ratio, target, distractor, recovered=None):
        return {"structure": "width", "mode": mode, "criterion": mode.split("/")[0], "ratio": ratio, "kept_width": 8,
                "exact_ratio": ratio, "capture": "response", "seconds": {"select": 0.1}, "pruned": result(target, distractor),
                **({"recovered": result(*recovered)} if recovered else {})}

    summary = {"model": "m", "num_layers": 2, "width": 16, "multiple_of": 8, "recovery_steps": 1, "wall_time_s": 6.0,
               "default_criterion": "compensated", "dense": result(1.40, 3.80),
               "layer_counts": {k: [1, 2] for k in ("target", "distractor", "target_strong", "distractor_strong")},
               "runs": [run("compensated", 0.5, 1.55, 4.9, recovered=(1.50, 4.5)), run("wanda_sp", 0.5, 1.50, 4.0),
                        run("random/seed42", 0.5, 2.0, 4.2), run(PAPER_MODE, 0.5, 2.5, 4.4)]}
    assert metric_for(summary["dense"]).key == "nll_target"
    report = write_sweep_report(summary, tmp_path).read_text()
    assert "| wanda_sp | **1.500** |" in report  # the lowest NLL is the best
    assert "`compensated` was **beaten after pruning** at 50% (1 variant(s), best wanda_sp 1.500 vs 1.550)" in report
    assert "**worse than the mean of random pruning** at 50%" in report  # the paper's selective (2.5 vs 2.0)
    assert (tmp_path / "fig_distractor_vs_target_nll.png").stat().st_size > 1000
    assert "traps |" not in report and "SSS pruned" not in report  # columns only for what was measured
    assert "| wanda_sp | **1.500** | 100 | 5.0 | 0.10 |" in report  # no PPL measured; params, tok/s

    # The default against the best published peer, with the paired error of their difference over the texts.
    texts = {"a": [10.0, 10], "b": [20.0, 10], "c": [5.0, 10]}
    for run_ in summary["runs"]:
        shift = {"compensated": 1.0, "wanda_sp": 2.0}.get(run_["mode"], 0.0)
        run_["pruned"]["nll_texts"] = {"target": {k: [v[0] + shift * (1 + 0.1 * i), v[1]]
                                                  for i, (k, v) in enumerate(texts.items())}}
    summary["runs"].append(run("magnitude", 0.5, 1.60, 4.0))
    report = write_sweep_report(summary, tmp_path).read_text()
    assert "## The default against the best peer" in report
    # +0.150 against wanda_sp's +0.100 (magnitude +0.200 is the worse peer): ratio 1.50; paired difference of the
    # texts' sums (-1.0, -1.1, -1.2) over 30 tokens = -0.110, error sqrt(3/2 * sum(d_i - D t_i)^2) / 30
    error = math.sqrt(1.5 * sum((d + 0.11 * 10) ** 2 for d in (-1.0, -1.1, -1.2))) / 30
    assert (f"| 50% (8) | +0.150 | `wanda_sp` +0.100 | 1.50 | -0.110 +- {error:.3f} (3 texts) | `wanda_sp` +0.100 |"
            in report)
    for run_ in summary["runs"]:  # the peer scored other texts: no paired difference, the report still written
        if run_["mode"] == "wanda_sp":
            run_["pruned"]["nll_texts"] = {"target": {"other": [1.0, 10]}}
    assert "| 50% (8) | +0.150 | `wanda_sp` +0.100 | 1.50 | - |" in write_sweep_report(summary, tmp_path).read_text()
    with pytest.raises(ValueError, match="no metric to rank by"):
        metric_for({"sss": 0.9})


PAPER_MODE = "selective/paper"


@pytest.mark.slow
def test_demo_keeps_every_evaluation(tmp_path):
    """Dense, the paper's selective, the default criterion and it after LoRA: four rows and four result files (the
    recovered evaluation runs on a fresh Trainer and must not overwrite the pruned one's)."""
    model = save_tiny_model(tmp_path / "model")
    cli_main(["demo", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
              f"--trainer.default_root_dir={tmp_path}", f"--model.export_dir={tmp_path / 'export'}",
              f"--model.evaluation.output_dir={tmp_path / 'eval'}", *_data_args()])
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert [r["label"].split(" (")[0] for r in demo["results"]] == ["dense", "pruned 25.0%", "pruned 25.0%",
                                                                     "compensated + LoRA"]
    files = sorted(p.name for p in (tmp_path / "eval").glob("*.json"))
    assert files == ["compensated-25pct+lora.json", "compensated-25pct.json", "dense.json", "selective__paper_.json"]
    assert len({json.loads((tmp_path / "eval" / f).read_text())["label"] for f in files}) == 4
