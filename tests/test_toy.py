"""The toy task-specific model: generators, a few steps of its real training path, the shipped checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_prune.eval.gsm8k import is_exact_match
from lit_prune.toy import ToyRecipe, make_math_problem, math_examples, prepare, qna_examples, solve_math_prompt

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "toy-math"


def test_generators_are_seeded_and_correct():
    assert math_examples(50, seed=7) == math_examples(50, seed=7)
    assert math_examples(50, seed=7) != math_examples(50, seed=8)
    rng = random.Random(3)
    for _ in range(500):
        problem = make_math_problem(rng)
        assert 1 <= len(problem.steps) <= 2 + 1
        value = None
        for left, op, right, result in problem.steps:
            assert result == {"+": left + right, "-": left - right, "*": left * right}[op]
            assert value is None or left == value
            value = result
        assert problem.answer == value >= 0 and solve_math_prompt(problem.prompt) == value
        assert is_exact_match(problem.response, str(value))
    for record in qna_examples(50, seed=1):
        assert record["response"] in record["prompt"]  # the answer is copied from the passage


def test_a_few_steps_of_the_toy_training_path(tmp_path, monkeypatch):
    """`prepare` + the project's CLI fit on the toy config, shrunk to a tiny model and a few steps."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    recipe = ToyRecipe(math_train=64, qna_train=32, dialogue_train=32, held_out=8, vocab_size=320, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    init = prepare(run, recipe)
    from lit_prune.cli import cli_main

    cli = cli_main(["fit", "--config", "configs/toy-train.yaml", f"--model.model_name_or_path={init}",
                    f"--model.export_dir={run / 'export'}", f"--trainer.default_root_dir={run}",
                    "--trainer.logger=false", "--trainer.max_steps=6", "--trainer.val_check_interval=3",
                    "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.batch_size=8",
                    "--data.val_samples=8", f"--data.target={run / 'data' / 'math_capture.jsonl'}",
                    f"--data.distractors=[{run / 'data' / 'qna_capture.jsonl'}]",
                    f"--data.finetune=[{run / 'data' / 'math_train.jsonl'}, {run / 'data' / 'qna_train.jsonl'}]"])
    assert cli.trainer.global_step == 6
    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert model.config.intermediate_size == 64


def test_shipped_toy_model():
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("checkpoints/toy-math is not built (python -m lit_prune.toy all)")
    model = AutoModelForCausalLM.from_pretrained(SHIPPED)
    assert model.config.intermediate_size >= 1024 and model.config.model_type == "qwen2"
    assert (SHIPPED / "model.safetensors").stat().st_size < 20 * 2**20
    evaluation = json.loads((SHIPPED / "toy_eval.json").read_text())
    assert evaluation["math_n"] == 200 and 0.0 <= evaluation["math_exact_match"] <= 1.0
    for name in ("math_eval", "math_capture", "qna_eval", "qna_capture", "math_finetune"):
        assert (SHIPPED / f"{name}.jsonl").is_file(), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
