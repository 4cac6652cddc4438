"""Teacher-forced NLL / perplexity: the batched metric against per-example ``model(labels=...).loss``, in the suite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_prune.data import PruneDataModule, load_examples, load_texts
from lit_prune.data.prompts import MATH_INSTRUCTION
from lit_prune.eval.perplexity import (IGNORE_INDEX, TokenNLL, nll_standard_error, paired_nll_difference,
                                      perplexity_batch, per_text_nll, sequence_nll, text_tokens)
from lit_prune.eval.suite import EvalSettings
from lit_prune.module import PrunableCausalLM
from lit_prune.eval.report import print_comparison
from lit_prune.tiny import make_tiny_model, save_tiny_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GSM8K_TEST = str(SHARED / "gsm8k" / "test.jsonl")
SQUAD = str(SHARED / "squad" / "small-v2.json")
DIALOG = str(SHARED / "dailydialog" / "test.txt")


def _by_hand(model, tokenizer, prompt: str | None, response: str, system: str | None = None) -> tuple[float, int]:
    """Summed NLL and token count of one unpadded example, from transformers' own mean loss."""
    if prompt is None:  # plain text after a one-token prefix (the tiny tokenizer has no BOS: EOS)
        prompt_ids = [tokenizer.eos_token_id]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = torch.tensor([prompt_ids + response_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=labels).loss
    return float(loss) * len(response_ids), len(response_ids)


def test_batched_nll_equals_per_example_loss_and_ignores_padding_and_prompt():
    model, tokenizer = make_tiny_model()
    prompts = ["Tom has 12 apples and buys 7 more. How many apples does Tom have?", "Hello?"]
    responses = ["12 + 7 = 19. \\boxed{19}", "I am fine, thank you. Shall we go to the park today?"]
    tensors, kept = perplexity_batch(tokenizer, prompts, responses, ["math", "dialogue"], max_length=256)
    assert kept == [True, True] and (tensors["attention_mask"] == 0).any()  # rows of different lengths: padding
    sums, counts = sequence_nll(model, **tensors)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        expected_sum, expected_count = _by_hand(model, tokenizer, prompt, response,
                                                MATH_INSTRUCTION if i == 0 else None)
        assert int(counts[i]) == expected_count == len(tokenizer(response)["input_ids"]) + 1  # response + EOS
        assert float(sums[i]) == pytest.approx(expected_sum, rel=1e-5)
    # Longer than max_length: dropped, never cut (the math row, with its system instruction, is the longer one).
    lengths = tensors["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] > lengths[1]
    _, kept = perplexity_batch(tokenizer, prompts, responses, ["math", "dialogue"], max_length=lengths[1])
    assert kept == [False, True]


def test_plain_text_is_scored_after_a_one_token_prefix_and_cut():
    _, tokenizer = make_tiny_model()
    row = text_tokens(tokenizer, "Hello, how are you today?", max_length=5)
    assert len(row["input_ids"]) == 5 and row["input_ids"][0] == tokenizer.eos_token_id
    assert row["labels"] == [IGNORE_INDEX, *row["input_ids"][1:]]


def test_token_nll_is_token_weighted():
    metric = TokenNLL()
    assert metric.compute() is None  # nothing scored: no numbers, no warning noise
    metric.update(torch.tensor([2.0, 9.0]), torch.tensor([1, 3]))
    result = metric.compute()
    assert result["tokens"] == 4 and result["nll"] == pytest.approx(11.0 / 4)
    assert result["ppl"] == pytest.approx(math.exp(11.0 / 4))


def _ppl_data(**overrides) -> PruneDataModule:
    kwargs = dict(target="x", eval_ppl_target=GSM8K_TEST, eval_ppl_distractors=[SQUAD, DIALOG], eval_ppl_general=SQUAD,
                  eval_ppl_samples=4, eval_batch_size=3)
    return PruneDataModule(**{**kwargs, **overrides})


def _test(model_dir: Path, out: Path, devices: int = 1, **settings) -> dict:
    module = PrunableCausalLM(str(model_dir), evaluation=EvalSettings(
        throughput_new_tokens=2, output_dir=str(out), label="dense", **settings))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=_ppl_data(), verbose=False)
    return json.loads((out / "dense.json").read_text())


def test_suite_perplexity_without_generation_metrics_matches_hand_computation(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    results = _test(model_dir, tmp_path / "eval")
    assert "exact_match" not in results and results["sss"] is None  # no generation metric ran
    model, tokenizer = make_tiny_model()
    expected = {
        "target": [_by_hand(model, tokenizer, e.prompt, e.response, MATH_INSTRUCTION)
                   for e in load_examples(GSM8K_TEST, limit=4, seed=42)],
        "distractor": [_by_hand(model, tokenizer, e.prompt, e.response)
                       for source in (SQUAD, DIALOG) for e in load_examples(source, limit=4, seed=42)],
        "general": [_by_hand(model, tokenizer, None, text) for text in load_texts(SQUAD, limit=4, seed=42)],
    }
    for name, rows in expected.items():
        tokens = sum(n for _, n in rows)
        assert results[f"tokens_{name}"] == tokens, name
        assert results[f"nll_{name}"] == pytest.approx(sum(s for s, _ in rows) / tokens, rel=1e-5), name
        assert results[f"ppl_{name}"] == pytest.approx(math.exp(results[f"nll_{name}"]))
    records = [json.loads(line) for line in (tmp_path / "eval" / "dense.jsonl").read_text().splitlines()]
    assert len(records) == results["examples"] == 16 and {r["set"] for r in records} == set(expected)
    for name, rows in expected.items():  # per-text sums (for paired comparisons) and the error over texts
        texts = results["nll_texts"][name]
        assert sorted(v[1] for v in texts.values()) == sorted(n for _, n in rows)
        assert results[f"nll_{name}_se"] == pytest.approx(nll_standard_error(texts)) and results[f"nll_{name}_se"] > 0
    table = print_comparison([results])
    assert "PPL target" in table and "PPL distractor" in table and "PPL text" in table
    assert "PPL" not in print_comparison([{"label": "x", "exact_match": 0.5}])  # columns only when present

    off = _test(model_dir, tmp_path / "off", perplexity=False)
    assert not any(key.startswith(("nll_", "ppl_", "tokens_")) for key in off)


@pytest.mark.slow
def test_perplexity_is_the_same_on_one_and_two_ddp_ranks(tmp_path):
    """4 to 8 texts per set in batches of 3: 7 batches over 2 ranks (4 + 3); the sums of NLL and tokens add up."""
    model_dir = save_tiny_model(tmp_path / "model")
    one, two = _test(model_dir, tmp_path / "one"), _test(model_dir, tmp_path / "two", devices=2)
    for name in ("target", "distractor", "general"):
        assert one[f"tokens_{name}"] == two[f"tokens_{name}"] > 0, name
        assert one[f"nll_{name}"] == pytest.approx(two[f"nll_{name}"], rel=1e-6), name
    assert one["examples"] == two["examples"] == 16


def test_perplexity_data_errors(tmp_path):
    with pytest.raises(ValueError, match="`eval_ppl_samples` must be >= 1 or None; got 0"):
        PruneDataModule(target="x", eval_ppl_target=GSM8K_TEST, eval_ppl_samples=0)
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"prompt": "What is 2 + 2?"}\n')
    with pytest.raises(ValueError, match=r"`data.eval_ppl_target` source .*prompts.jsonl.* no examples with a ref"):
        PruneDataModule(target="x", eval_ppl_target=str(prompts_only)).eval_batches()
    with pytest.raises(ValueError, match=r"prompts.jsonl: line 1 has no string `text` field"):
        load_texts(str(prompts_only))
    assert len(load_texts(SQUAD)) == 87  # each paragraph once, not once per question


def _jackknife(sums, tokens):
    """Jackknife standard error of sum(x) / sum(t): an independent estimate of the ratio estimator's error."""
    sums, tokens = torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)
    n = len(sums)
    leave_one_out = (sums.sum() - sums) / (tokens.sum() - tokens)
    return math.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum().item())


def test_sampling_errors_match_the_jackknife_and_pair_texts_by_id():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 200, (400,), generator=generator).tolist()
    difficulty = torch.rand(400, generator=generator) * 3  # texts differ far more than the two models do
    a = [t * (float(d) + 0.1 * float(e)) for t, d, e in zip(tokens, difficulty, torch.randn(400, generator=generator))]
    b = [t * float(d) for t, d in zip(tokens, difficulty)]
    texts_a = {f"t{i}": [x, t] for i, (x, t) in enumerate(zip(a, tokens))}
    texts_b = {f"t{i}": [x, t] for i, (x, t) in enumerate(zip(b, tokens))}
    assert nll_standard_error(texts_a) == pytest.approx(_jackknife(a, tokens), rel=0.05)
    difference, error, count = paired_nll_difference(texts_a, texts_b)
    assert count == 400 and difference == pytest.approx((sum(a) - sum(b)) / sum(tokens))
    assert error == pytest.approx(_jackknife([x - y for x, y in zip(a, b)], tokens), rel=0.05)
    assert error < nll_standard_error(texts_a) / 5  # pairing removes the texts' own difficulty
    # Texts are paired by id; one scored with another token count, or only in one evaluation, is left out.
    texts_b["t0"] = [1.0, 1]
    del texts_b["t1"]
    assert paired_nll_difference(texts_a, texts_b)[2] == 398
    assert nll_standard_error({"one": [1.0, 2]}) is None
    with pytest.raises(ValueError, match="share no scored text"):
        paired_nll_difference({"x": [1.0, 2]}, {"y": [1.0, 2]})
    records = [{"task": "perplexity", "set": "target", "id": "a", "nll": 3.0, "tokens": 2},
               {"task": "perplexity", "set": "target", "id": "b", "skipped": "too long"},
               {"task": "math", "id": "c"}]
    assert per_text_nll(records) == {"target": {"a": [3.0, 2]}}


class _OwnModule(L.LightningModule):
    """A user's own LightningModule around a causal LM: no PrunableCausalLM, three hooks call the evaluator."""

    def __init__(self, model, tokenizer, settings: EvalSettings) -> None:
        super().__init__()
        from lit_prune.eval import Evaluator

        self.model, self.tokenizer = model, tokenizer
        self.evaluator = Evaluator(settings)

    def on_test_start(self):
        self.evaluator.start(self)

    def test_step(self, batch, batch_idx):
        self.evaluator.step(self, batch)

    def on_test_epoch_end(self):
        self.evaluator.finish(self)


def test_any_lightning_module_with_a_causal_lm_is_evaluated_and_gets_its_results_back(tmp_path):
    from lit_prune.eval import evaluate

    model_dir = save_tiny_model(tmp_path / "model")
    reference = _test(model_dir, tmp_path / "reference")  # the same weights through PrunableCausalLM
    model, tokenizer = make_tiny_model()
    model.config.name_or_path = "my-org/my-model"
    module = _OwnModule(model, tokenizer, EvalSettings(throughput_new_tokens=2, output_dir=str(tmp_path / "own")))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    results = evaluate(trainer, module, _ppl_data())
    assert results["label"] == "my-model" and results["model"] == "my-org/my-model"  # named after its source
    for name in ("target", "distractor", "general"):
        assert results[f"nll_{name}"] == pytest.approx(reference[f"nll_{name}"], rel=1e-6)
    assert json.loads((tmp_path / "own" / "my-model.json").read_text())["nll_target"] == results["nll_target"]
    assert trainer.callback_metrics["test/nll_target"] == pytest.approx(results["nll_target"])
    with pytest.raises(ValueError, match="needs a module with an `evaluator`"):
        evaluate(trainer, L.LightningModule(), _ppl_data())
