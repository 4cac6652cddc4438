"""Smoke tests of the benchmark scripts in ``benchmarks/``: smallest settings, JSON keys and sane values.

No assertion on wall-clock time (house style, rule 16): the numbers only have to exist, be finite and
agree with the shapes they were measured on.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lit_prune.pruning import kept_width

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MACHINE_KEYS = {"date", "cpu_model", "physical_cores", "torch", "transformers", "torch_threads", "memory_gb"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The scripts fix the thread count and flush denormals; give the rest of the session its settings back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def _check_common(payload: dict, out: Path, name: str) -> None:
    assert payload["benchmark"] == name
    assert MACHINE_KEYS <= payload["machine"].keys()
    assert payload["machine"]["torch_threads"] == 1
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow  # the heaviest benchmark smokes (8-20 s): the fast tier stays under 2 min
def test_capture_overhead(tmp_path):
    out = tmp_path / "capture.json"
    payload = _load("capture_overhead").main([
        "--layers", "1", "--vocab", "64", "--batches", "2", "--batch-size", "2", "--min-tokens", "3",
        "--max-tokens", "6", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out),
    ])
    _check_common(payload, out, "capture_overhead")
    assert set(payload["variants"]) == {"plain", "capture_forward", "capture_gram"}
    for variant in payload["variants"].values():
        for clock in ("wall", "cpu"):
            assert len(variant[clock]["seconds"]) == 1
            assert _finite_positive(variant[clock]["throughput_vs_plain"])
    assert payload["variants"]["plain"]["wall"]["throughput_vs_plain"] == 1.0
    assert payload["headline_clock"] == "cpu"  # one thread: CPU time stands for the idle-machine wall time
    assert _finite_positive(payload["capture_over_plain"])
    assert 0 < payload["variants"]["capture_forward"]["hook_only_estimate"] <= 1
    settings = payload["settings"]
    assert (settings["num_layers"], settings["intermediate_size"], settings["hidden_size"]) == (1, 4864, 896)
    assert payload["stats_bytes"] == 10 * 1 * 4864 * 8 + 4 * 8  # per group five float64 (L, d_ff) sums, 2 counters


@pytest.mark.slow  # the heaviest benchmark smokes (8-20 s): the fast tier stays under 2 min
def test_stats_memory(tmp_path):
    out = tmp_path / "memory.json"
    payload = _load("stats_memory").main([
        "--model", "0.5b", "--layers", "1", "--vocab", "64", "--prompts", "2,4", "--tokens", "4",
        "--batch-size", "2", "--modes", "capture", "--no-logits-check", "--threads", "1", "--out", str(out),
    ])
    _check_common(payload, out, "stats_memory")
    rows = {row["prompts"]: row for row in payload["per_prompts"]}
    assert set(rows) == {2, 4}
    assert rows[2]["stats_bytes"] == rows[4]["stats_bytes"] == 10 * 4864 * 8 + 32  # independent of N
    assert all(row["capture_growth_bytes"] >= 0 for row in rows.values())
    assert all(run["samples_counted"] == run["prompts"] for run in payload["runs"])
    paper = {row["model"]: row for row in payload["paper_comparison"]}
    assert paper["Qwen2.5-7b"]["paper_bytes"] == 3200 * 28 * 18944 * 4
    assert paper["Qwen2.5-1.5b"]["ours_stats_bytes"] == 10 * 28 * 8960 * 8 + 32
    assert 155 < paper["Qwen2.5-1.5b"]["paper_over_ours_stats"] < 165  # N * 4 bytes / (10 * 8 bytes)
    assert payload["logits_check"] == []


def test_pruned_speed(tmp_path):
    out = tmp_path / "speed.json"
    payload = _load("pruned_speed").main([
        "--layers", "1", "--vocab", "512", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
        "--prefill-batch", "1", "--prefill-len", "8", "--prefill-repeats", "1", "--threads", "1", "--out", str(out),
    ])
    _check_common(payload, out, "pruned_speed")
    models = payload["models"]
    assert list(models) == ["dense", "pruned_10", "pruned_20", "pruned_35"]
    for ratio, name in ((0.1, "pruned_10"), (0.2, "pruned_20"), (0.35, "pruned_35")):
        assert models[name]["kept_width"] == kept_width(4864, ratio, 128)
    limits = [models[n]["decode_limit"] for n in models]
    assert limits[0] == 1.0 and limits == sorted(limits)  # more pruning, fewer bytes per token
    # Dense bytes per token: one layer's attention and MLP linears (with the q/k/v biases) and the 512 x 896 head.
    attention = 896 * 896 * 2 + 896 * 128 * 2 + 896 + 128 * 2
    assert models["dense"]["weight_bytes_per_token"] == 4 * (attention + 3 * 896 * 4864 + 512 * 896)
    for entry in models.values():
        for kind in ("generate", "loop", "prefill"):
            for clock in ("wall", "cpu"):
                assert _finite_positive(entry[kind][clock]["median_tokens_per_s"])
                assert _finite_positive(entry[kind][clock]["speedup_over_limit"])
    assert models["dense"]["generate"]["cpu"]["speedup"] == 1.0
    assert set(payload["decode_speedup_over_limit"]) == {"pruned_10", "pruned_20", "pruned_35"}


def test_pipeline(tmp_path):
    out = tmp_path / "pipeline.json"
    pipeline = _load("pipeline")
    payload = pipeline.main([
        "--threads", "1", "--evaluate", "never", "--out", str(out), "--",
        "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
    ])
    _check_common(payload, out, "pipeline")
    phases = payload["phases_s"]
    assert set(phases) == set(pipeline.PHASES)
    assert phases["evaluate"] is None
    for name in ("load", "capture", "select", "slice", "lora_wrap", "lora_train", "export"):
        assert phases[name] is not None and phases[name] >= 0
    assert phases["capture"] > 0 and phases["export"] > 0
    run = payload["runs"][0]
    assert run["global_step"] == 1 and run["exported"]
    assert run["plan"]["kept_width"] == 192  # configs/tiny.yaml: 25% of d_ff 256, multiple_of 32


def test_pipeline_sends_outputs_to_workdir(tmp_path):
    overrides = _load("pipeline").output_overrides(BENCHMARKS.parent / "configs" / "tiny.yaml", tmp_path)
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    assert pairs["--trainer.default_root_dir"] == str(tmp_path)
    assert pairs["--model.export_dir"] == str(tmp_path / "export")


def test_compensate_time(tmp_path):
    out = tmp_path / "compensate.json"
    payload = _load("compensate_time").main(["--model", "1.5b", "--width", "256", "--ratios", "0.5", "--threads", "1",
                                             "--out", str(out)])
    _check_common(payload, out, "compensate_time")
    (result,) = payload["results"]
    assert result["kept_width"] == 128 and payload["settings"]["num_layers"] == 28
    assert _finite_positive(result["compensated_per_layer_s"])
    assert result["compensated_model_s"] == pytest.approx(28 * result["compensated_per_layer_s"])


def test_criteria_nll(tmp_path):
    from lit_prune.tiny import save_tiny_model

    tiny_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "criteria.json"
    payload = _load("criteria_nll").main(["--model", str(tiny_dir), "--ratios", "0.5", "--variants",
                                          "compensated,wanda_sp,energy+refit,paper", "--multiple-of", "32",
                                          "--capture", "4", "--eval", "3", "--max-length", "64", "--threads", "1",
                                          "--out", str(out)])
    _check_common(payload, out, "criteria_nll")
    assert {r["variant"] for r in payload["results"]} == {"compensated", "wanda_sp", "energy+refit", "paper"}
    assert all(r["kept_width"] == 128 and math.isfinite(r["delta_target"]) for r in payload["results"])
    assert payload["headline"]["0.5"]["best_peer"] == "wanda_sp"
    assert set(payload["capture_s"]) == {"response", "prompt"}
