"""``trainer.test``: generation, metrics and reports on the tiny model, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_prune.cli import cli_main
from lit_prune.data import PruneDataModule
from lit_prune.eval.suite import EvalSettings
from lit_prune.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _args(tmp_path, model, *extra):
    return ["test", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.model_name_or_path={model}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            f"--model.evaluation.output_dir={tmp_path / 'eval'}", "--data.eval_samples=3",
            f"--data.target={SHARED / 'gsm8k' / 'train.jsonl'}",
            f"--data.distractors=[{SHARED / 'squad' / 'small-v2.json'}, {SHARED / 'dailydialog' / 'validation.txt'}]",
            f"--data.eval_math={SHARED / 'gsm8k' / 'test.jsonl'}",
            f"--data.eval_qna={SHARED / 'squad' / 'small-v2.json'}",
            f"--data.eval_dialogue={SHARED / 'dailydialog' / 'test.txt'}", *extra]


def test_dense_then_pruned_evaluation_writes_reports(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    dense = cli_main(_args(tmp_path, model, "--trainer.callbacks=null", "--model.evaluation.label=dense"))
    dense_json = json.loads((tmp_path / "eval" / "dense.json").read_text())
    assert dense_json["label"] == "dense" and dense_json["sss"] is None  # the reference model itself
    assert dense_json["parameters"] > 0 and dense_json["mlp_width"] == 256
    assert 0.0 <= dense_json["exact_match"] <= 1.0 and 0.0 <= dense_json["pass_at_1"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "eval" / "dense.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"math", "code", "qna", "dialogue"} and len(records) == 12
    math = [r for r in records if r["task"] == "math"]
    assert all({"reference", "extracted", "correct", "trap"} <= r.keys() for r in math)
    assert (tmp_path / "reference_outputs.json").is_file()  # the dense outputs are the pruned models' reference
    assert dense.model.evaluator.results["decode_tokens_per_s"] > 0

    cli_main(_args(tmp_path, model, "--model.evaluation.label=pruned"))
    pruned_json = json.loads((tmp_path / "eval" / "pruned.json").read_text())
    assert pruned_json["mlp_width"] == 192 and pruned_json["plan"]["exact_ratio"] == 0.25
    assert pruned_json["parameters"] < dense_json["parameters"]
    assert -1.0 <= pruned_json["bertscore_qna"] <= 1.0 and -1.0 <= pruned_json["sbert_dialog"] <= 1.0
    assert pruned_json["sss"] == pytest.approx((pruned_json["bertscore_qna"] + pruned_json["sbert_dialog"]) / 2)


def test_eval_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="`evaluation.max_new_tokens_math` must be >= 1; got 0"):
        EvalSettings(max_new_tokens_math=0)
    with pytest.raises(ValueError, match="no evaluation data"):
        PruneDataModule(target="x").eval_batches()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        PruneDataModule(target="x", eval_math=str(bad)).eval_batches()
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        PruneDataModule(target="x", eval_math=str(tmp_path / "missing.jsonl")).eval_batches()


def _test_on(devices: int, tmp_path: Path, model: Path) -> dict:
    import lightning as L

    from lit_prune.module import PrunableCausalLM

    settings = EvalSettings(max_new_tokens_math=12, max_new_tokens_distractor=8, batch_size=2,
                            throughput_new_tokens=4, output_dir=str(tmp_path / f"eval{devices}"), label="dense")
    module = PrunableCausalLM(str(model), evaluation=settings)
    data = PruneDataModule(target="x", eval_math=str(SHARED / "gsm8k" / "test.jsonl"), eval_samples=6,
                           eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=data, verbose=False)
    return json.loads((tmp_path / f"eval{devices}" / "dense.json").read_text())


@pytest.mark.slow
def test_metrics_sync_across_ddp_ranks(tmp_path):
    """Three batches over two ranks (2 + 1): the synced metrics and gathered records equal one process's."""
    model = save_tiny_model(tmp_path / "model")
    one, two = _test_on(1, tmp_path, model), _test_on(2, tmp_path, model)
    assert one["examples"] == two["examples"] == 6
    for key in ("exact_match", "trap_type1", "trap_type2", "trap_total"):
        assert one[key] == two[key], key
    records = {r["id"]: r["output"] for r in map(json.loads, (tmp_path / "eval2" / "dense.jsonl").read_text().splitlines())}
    assert len(records) == 6


def test_the_result_table_fits_an_80_column_terminal():
    import io

    from rich.console import Console

    from lit_prune.eval.report import print_comparison

    row = {"label": "pruned 25.0% (compensated)", "exact_match": 1.0, "trap_type1": 0.0, "trap_type2": 0.0,
           "trap_total": 0.0, "sss": 0.993, "parameters": 3_800_000, "mlp_width": 768, "weights_mb": 14.0,
           "peak_memory_mb": 950.0, "decode_tokens_per_s": 160.0}
    for width, tables in ((80, 2), (200, 1)):
        out = io.StringIO()
        plain = print_comparison([row, dict(row, label="dense")], console=Console(width=width, file=out))
        text = out.getvalue()
        assert max(len(line) for line in text.splitlines()) <= width
        assert text.count("lit_prune evaluation") == tables and "Tokens/s" in text and "GSM8K EM" in text
        assert "│ pruned 25.0% (compensated) │" in plain  # the returned text (READMEs, logs) stays one wide table


def test_metric_counts_stay_exact_when_bf16_true_converts_the_module():
    """bf16-true converts the whole module, metric states included: bfloat16 counts exactly only to 256."""
    from lightning.pytorch.plugins.precision import HalfPrecision
    from torch import nn

    from lit_prune.eval.suite import EvaluationSuite

    holder = nn.Module()
    holder.suite = EvaluationSuite(EvalSettings())
    HalfPrecision("bf16-true").convert_module(holder)
    holder.suite.reset()  # what the evaluator does at the start of every evaluation
    for _ in range(165):  # 1,320 generations, 3 hits in 8
        holder.suite.exact_match.update(["\\boxed{1}"] * 3 + ["no answer"] * 5, ["1"] * 8)
        holder.suite.pass_at_1.update([True] * 3 + [False] * 5)
        holder.suite.token_nll["target"].update(torch.tensor([0.1] * 8), torch.tensor([7] * 8))
    assert float(holder.suite.exact_match.compute()) == 0.375 and float(holder.suite.pass_at_1.compute()) == 0.375
    assert holder.suite.token_nll["target"].compute()["tokens"] == 1320 * 7


def test_settings_pickled_under_their_old_module_names_still_load(tmp_path):
    """Checkpoints written before LoraSettings / EvalSettings moved name them lit_prune.module / lit_prune.evaluation;
    Lightning loads with weights_only, whose allow-list is by that name."""
    from lit_prune.recovery import LoraSettings

    for cls, old in ((LoraSettings, "lit_prune.module"), (EvalSettings, "lit_prune.evaluation")):
        new = cls.__module__
        cls.__module__ = old  # pickle it as the earlier code did
        try:
            torch.save({"hyper_parameters": {"x": cls()}}, tmp_path / "old.ckpt")
        finally:
            cls.__module__ = new
        assert old.encode() in (tmp_path / "old.ckpt").read_bytes()  # the file names the old module
        loaded = torch.load(tmp_path / "old.ckpt", weights_only=True)
        assert loaded["hyper_parameters"]["x"] == cls()


def test_evaluate_refuses_to_return_a_previous_evaluations_results(tmp_path):
    import lightning as L

    from lit_prune.data import PruneDataModule
    from lit_prune.eval import evaluate
    from lit_prune.module import PrunableCausalLM

    module = PrunableCausalLM(str(save_tiny_model(tmp_path / "model")),
                              evaluation=EvalSettings(throughput_new_tokens=2, output_dir=str(tmp_path / "eval")))
    module.evaluator.results = {"label": "stale"}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=0)
    data = PruneDataModule(target="x", eval_ppl_target=str(SHARED / "gsm8k" / "test.jsonl"), eval_ppl_samples=2)
    with pytest.raises(RuntimeError, match="ran no evaluation"):
        evaluate(trainer, module, data)


@pytest.mark.slow
def test_a_task_with_fewer_batches_than_ranks_is_evaluated_on_two_ddp_ranks(tmp_path):
    """One math batch over 2 ranks: rank 1 sees none, yet every rank must compute (and sync) the math metrics."""
    import lightning as L

    from lit_prune.module import PrunableCausalLM

    model_dir = save_tiny_model(tmp_path / "model")
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"eval{devices}"
        module = PrunableCausalLM(str(model_dir), evaluation=EvalSettings(
            throughput_new_tokens=2, max_new_tokens_math=8, output_dir=str(out), label="dense"))
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_progress_bar=False, enable_model_summary=False)
        data = PruneDataModule(target="x", eval_math=str(SHARED / "gsm8k" / "test.jsonl"), eval_samples=3,
                               eval_batch_size=8, eval_ppl_target=str(SHARED / "gsm8k" / "test.jsonl"),
                               eval_ppl_samples=3)
        trainer.test(module, datamodule=data, verbose=False)
        results[devices] = json.loads((out / "dense.json").read_text())
    for key in ("exact_match", "trap_total", "nll_target", "tokens_target"):
        assert results[1][key] == pytest.approx(results[2][key]), key
    assert results[1]["examples"] == results[2]["examples"] == 6
