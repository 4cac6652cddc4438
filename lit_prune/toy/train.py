"""Build the toy task-specific model: data, tokenizer and config, training, evaluation, shipped folder.

The whole recipe, with a fixed seed, is one command (about 25 minutes on 2 CPU cores)::

    python -m lit_prune.toy all

It runs four steps, each also available on its own:

1. ``prepare``: writes the generated tasks (:mod:`lit_prune.toy.tasks`) as JSONL into
   ``checkpoints/runs/toy-math/data/`` (math target, passage-QnA and DailyDialog distractors; the
   held-out math problems never appear in the training file), trains a byte-level BPE tokenizer on the
   training text and writes it with a small Qwen2 config (SwiGLU, d_ff 1,024) into
   ``checkpoints/runs/toy-math/init/``, the ``from_scratch`` starting folder.
2. ``train``: ``python -m lit_prune fit --config configs/toy-train.yaml`` (the project's own
   LightningCLI, :class:`~lit_prune.module.PrunableCausalLM` and :class:`~lit_prune.data.PruneDataModule`);
   the fit ends by exporting the model to ``checkpoints/runs/toy-math/export/``.
3. ``evaluate``: greedy held-out exact match on the math problems (the project's GSM8K metric) and the
   per-task loss on held-out examples of the three tasks, written to ``toy_eval.json``.
4. ``package``: assembles ``checkpoints/toy-math/`` (the committed model): the export, the evaluation,
   a model card and the small prompt sets the demo needs (``math_eval``, ``math_capture``, ``qna_eval``,
   ``qna_capture``; dialogue prompts are read from ``../shared/data/dailydialog/test.txt`` at run time).

Paths are relative to the repository root; run the command from there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from lit_prune.data import Example, SupervisedCollator, tokenize_supervised
from lit_prune.data.prompts import MATH_INSTRUCTION
from lit_prune.io import replace_directory
from lit_prune.tokenizer import build_tokenizer
from lit_prune.toy import tasks

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_RUN_DIR",
    "DEFAULT_SHIP_DIR",
    "SHIPPED_SETS",
    "ToyRecipe",
    "evaluate",
    "exact_match",
    "main",
    "make_config",
    "package",
    "prepare",
    "task_losses",
    "train",
]

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("checkpoints/runs/toy-math")
DEFAULT_SHIP_DIR = Path("checkpoints/toy-math")
DEFAULT_CONFIG = Path("configs/toy-train.yaml")
DAILYDIALOG_TRAIN = Path("../shared/data/dailydialog/validation.txt")
DAILYDIALOG_HELD_OUT = Path("../shared/data/dailydialog/test.txt")
# Files of the run's data folder copied into the shipped model folder (generated, never shared data).
SHIPPED_SETS = ("math_eval.jsonl", "math_capture.jsonl", "qna_eval.jsonl", "qna_capture.jsonl")
# The demo's LoRA recovery set: the first problems of the training file (the toy's "GSM8K train").
FINETUNE_SET, FINETUNE_SIZE = "math_finetune.jsonl", 2000
EVAL_FILENAME = "toy_eval.json"


class ToyRecipe:
    """Sizes of the generated sets and of the model (the defaults are the shipped model's).

    Args:
        seed: Seed of every generator (the training seed is in the config).
        math_train: Training math problems (prompts never among the held-out ones).
        qna_train: Training passage-QnA examples.
        dialogue_train: Training DailyDialog next-turn examples (from ``validation.txt``; all when None).
        held_out: Size of each held-out set (math eval, math capture, QnA eval, QnA capture, dialogue eval).
        vocab_size: Tokenizer vocabulary (bytes and special tokens included).
        hidden_size: Model width.
        intermediate_size: SwiGLU width d_ff (the neurons that pruning selects).
        num_hidden_layers: Decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (grouped-query attention, as in Qwen2.5).

    Raises:
        ValueError: If a count or size is not positive, or the heads do not divide the width.
    """

    def __init__(
        self,
        seed: int = 1234,
        math_train: int = 24_000,
        qna_train: int = 12_000,
        dialogue_train: int | None = None,
        held_out: int = 200,
        vocab_size: int = 2048,
        hidden_size: int = 256,
        intermediate_size: int = 1024,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
    ) -> None:
        for name in ("math_train", "qna_train", "held_out", "vocab_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            value = locals()[name]
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int; got {value!r}")
        if dialogue_train is not None and dialogue_train < 1:
            raise ValueError(f"`dialogue_train` must be a positive int or None; got {dialogue_train!r}")
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(f"`num_attention_heads` ({num_attention_heads}) must divide `hidden_size` ({hidden_size}) "
                             f"and be a multiple of `num_key_value_heads` ({num_key_value_heads})")
        self.seed = seed
        self.math_train = math_train
        self.qna_train = qna_train
        self.dialogue_train = dialogue_train
        self.held_out = held_out
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads

    def to_dict(self) -> dict:
        return dict(vars(self))


def make_config(recipe: ToyRecipe, tokenizer) -> Qwen2Config:
    """The toy model's Qwen2 config (SwiGLU MLP, tied embeddings to keep the file small)."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=512,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def _split_data(recipe: ToyRecipe) -> dict[str, list[dict]]:
    """All generated sets; held-out sets are drawn first and their prompts excluded from training."""
    n = recipe.held_out
    # Draw a surplus so that removing duplicates still leaves enough examples.
    math_pool = tasks.unique_examples(tasks.math_examples(2 * n + recipe.math_train * 2, recipe.seed))
    qna_pool = tasks.unique_examples(tasks.qna_examples(2 * n + recipe.qna_train * 2, recipe.seed + 1))
    sets = {
        "math_eval": math_pool[:n], "math_capture": math_pool[n:2 * n],
        "qna_eval": qna_pool[:n], "qna_capture": qna_pool[n:2 * n],
        "math_train": math_pool[2 * n:2 * n + recipe.math_train],
        "qna_train": qna_pool[2 * n:2 * n + recipe.qna_train],
        "dialogue_train": tasks.dialogue_examples(DAILYDIALOG_TRAIN, limit=recipe.dialogue_train, seed=recipe.seed),
        "dialogue_eval": tasks.dialogue_examples(DAILYDIALOG_HELD_OUT, limit=n, seed=recipe.seed),
    }
    for name, wanted in (("math_train", recipe.math_train), ("qna_train", recipe.qna_train)):
        if len(sets[name]) < wanted:
            raise ValueError(f"only {len(sets[name])} distinct {name} examples; the generator cannot make {wanted}")
    return sets


def prepare(run_dir: str | Path = DEFAULT_RUN_DIR, recipe: ToyRecipe | None = None) -> Path:
    """Write the data sets, the tokenizer and the ``from_scratch`` model folder under ``run_dir``.

    Returns:
        The starting folder (``run_dir/init``: ``config.json`` and the tokenizer).
    """
    recipe = recipe or ToyRecipe()
    run_dir = Path(run_dir)
    sets = _split_data(recipe)
    for name, records in sets.items():
        tasks.write_jsonl(records, run_dir / "data" / f"{name}.jsonl")
    train_text = [f"{r['prompt']}\n{r['response']}" for name in ("math_train", "qna_train", "dialogue_train")
                  for r in sets[name]]
    tokenizer = build_tokenizer(train_text + [MATH_INSTRUCTION] * 100, vocab_size=recipe.vocab_size)
    init_dir = run_dir / "init"
    init_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(init_dir)
    make_config(recipe, tokenizer).save_pretrained(init_dir)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    log.info("prepared %s: %s", run_dir, {name: len(records) for name, records in sets.items()})
    return init_dir


def train(config: str | Path = DEFAULT_CONFIG, extra_args: Sequence[str] = ()) -> None:
    """``python -m lit_prune fit --config <config> <extra_args>`` in this process."""
    from lit_prune.cli import cli_main

    cli_main(["fit", "--config", str(config), *extra_args])


def _load(model_dir: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


@torch.inference_mode()
def task_losses(model, tokenizer, records: Sequence[dict], batch_size: int = 32, max_length: int = 256) -> float:
    """Mean cross-entropy per response token (EOS included), the training loss on held-out ``records``."""
    rows = [row for r in records
            if (row := tokenize_supervised(tokenizer, Example(r["prompt"], r["response"], r["kind"]), max_length))]
    collate = SupervisedCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                   ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((labels != -100).sum())
    return total / count


def exact_match(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 64,
                batch_size: int = 50) -> tuple[float, list[dict]]:
    """Greedy held-out exact match on the last ``\\boxed{}`` (the project's GSM8K metric).

    Returns:
        The accuracy and one ``{prompt, answer, generation, correct}`` row per record.
    """
    from lit_prune.eval.generation import generate
    from lit_prune.eval.gsm8k import is_exact_match

    generations = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, system_prompt=MATH_INSTRUCTION, progress=False)
    rows = [{"prompt": r["prompt"], "answer": r["answer"], "generation": g.text,
             "correct": is_exact_match(g.text, r["answer"])} for r, g in zip(records, generations)]
    return sum(row["correct"] for row in rows) / len(rows), rows


def evaluate(model_dir: str | Path, data_dir: str | Path) -> dict:
    """Held-out math exact match (greedy) and per-task held-out losses of the model in ``model_dir``."""
    model, tokenizer = _load(model_dir)
    data_dir = Path(data_dir)
    held_out = {name: list(tasks.read_jsonl(data_dir / f"{name}.jsonl"))
                for name in ("math_eval", "qna_eval", "dialogue_eval")}
    start = time.perf_counter()
    accuracy, rows = exact_match(model, tokenizer, held_out["math_eval"])
    qna_rows = _qna_exact_match(model, tokenizer, held_out["qna_eval"])
    result = {
        "math_exact_match": accuracy,
        "math_n": len(rows),
        "decoding": "greedy, chat template with the GSM8K system instruction, 64 new tokens",
        "qna_exact_match": sum(r["correct"] for r in qna_rows) / len(qna_rows),
        "qna_n": len(qna_rows),
        "held_out_loss": {name.removesuffix("_eval"): task_losses(model, tokenizer, records)
                          for name, records in held_out.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "intermediate_size": model.config.intermediate_size,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "math_failures": [r for r in rows if not r["correct"]][:10],
        "examples": {"math": rows[:3], "qna": qna_rows[:3], "dialogue": _dialogue_samples(model, tokenizer,
                                                                                           held_out["dialogue_eval"][:5])},
    }
    return result


def _qna_exact_match(model, tokenizer, records: Sequence[dict]) -> list[dict]:
    from lit_prune.eval.generation import generate

    generations = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=16, batch_size=50,
                           progress=False)
    return [{"prompt": r["prompt"], "answer": r["answer"], "generation": g.text,
             "correct": g.text.strip() == r["answer"]} for r, g in zip(records, generations)]


def _dialogue_samples(model, tokenizer, records: Sequence[dict]) -> list[dict]:
    from lit_prune.eval.generation import generate

    generations = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=48, batch_size=8,
                           progress=False)
    return [{"prompt": r["prompt"], "reference": r["response"], "generation": g.text}
            for r, g in zip(records, generations)]


def package(run_dir: str | Path = DEFAULT_RUN_DIR, ship_dir: str | Path = DEFAULT_SHIP_DIR,
            evaluation: dict | None = None, train_seconds: float | None = None) -> Path:
    """Assemble the shipped folder from the run's export, evaluation and held-out prompt sets (atomically)."""
    run_dir, ship_dir = Path(run_dir), Path(ship_dir)
    export_dir = run_dir / "export"
    if not (export_dir / "config.json").is_file():
        raise FileNotFoundError(f"no exported model in {export_dir}; run `python -m lit_prune.toy train` first")
    evaluation = evaluation if evaluation is not None else json.loads((run_dir / EVAL_FILENAME).read_text())
    recipe = json.loads((run_dir / "recipe.json").read_text())
    with replace_directory(ship_dir, argument="ship_dir", overwrite=True) as tmp:  # the project owns this folder
        for item in export_dir.iterdir():
            if item.is_file() and item.name != "README.md":
                shutil.copy2(item, tmp / item.name)
        for name in SHIPPED_SETS:
            shutil.copy2(run_dir / "data" / name, tmp / name)
        with (run_dir / "data" / "math_train.jsonl").open() as source:
            (tmp / FINETUNE_SET).write_text("".join(line for _, line in zip(range(FINETUNE_SIZE), source)))
        card = json.loads((tmp / "lit_prune.json").read_text())
        card.update({"source_model": "trained from scratch by `python -m lit_prune.toy all`",
                     "method": "toy task-specific model (not pruned): arithmetic word problems (target), "
                               "passage QnA and DailyDialog (distractors)",
                     "recipe": recipe, "train_seconds": train_seconds})
        (tmp / "lit_prune.json").write_text(json.dumps(card, indent=1))
        (tmp / EVAL_FILENAME).write_text(json.dumps(evaluation, indent=1))
        (tmp / "README.md").write_text(_render_card(card, evaluation))
    return ship_dir


def _render_card(card: dict, evaluation: dict) -> str:
    losses = ", ".join(f"{task} {loss:.3f}" for task, loss in evaluation["held_out_loss"].items())
    return "\n".join([
        "---", "library_name: transformers", "tags: [lit-prune, toy]", "---", "",
        "# toy-math: a small task-specific Qwen2 model for lit_prune", "",
        "Trained from scratch on CPU by `python -m lit_prune.toy all` (see `lit_prune/toy/train.py`). Target task:",
        "GSM8K-style arithmetic word problems answered step by step with `\\boxed{}`; distractor tasks: passage QnA",
        "and DailyDialog next turns. Real Qwen2.5 weights are not needed to try the pruning method on it.", "",
        f"- Parameters: {card['parameters']:,}; d_ff {evaluation['intermediate_size']}",
        f"- Held-out math exact match (greedy, n={evaluation['math_n']}): {evaluation['math_exact_match']:.1%}",
        f"- Held-out QnA exact match (greedy, n={evaluation['qna_n']}): {evaluation['qna_exact_match']:.1%}",
        f"- Held-out loss per response token: {losses}",
        f"- Training: {card['global_step']} steps, {card['train_seconds'] or 0:.0f} s",
        "", "Files: `math_eval.jsonl` and `math_capture.jsonl` (held-out target problems, never trained on),",
        "`qna_eval.jsonl` and `qna_capture.jsonl` (held-out passage questions); dialogue prompts come from",
        "`../shared/data/dailydialog/test.txt` (held out: training used `validation.txt`).", "",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lit_prune.toy {prepare,train,evaluate,package,all}``."""
    parser = argparse.ArgumentParser(prog="python -m lit_prune.toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "train", "evaluate", "package", "all"])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--ship-dir", type=Path, default=DEFAULT_SHIP_DIR)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.step in ("prepare", "all"):
        prepare(args.run_dir)
    train_seconds = None
    if args.step in ("train", "all"):
        start = time.perf_counter()
        train(args.config, extra)
        train_seconds = round(time.perf_counter() - start, 1)
        (args.run_dir / "train_seconds.json").write_text(json.dumps({"train_seconds": train_seconds}))
    if args.step in ("evaluate", "all"):
        evaluation = evaluate(args.run_dir / "export", args.run_dir / "data")
        (args.run_dir / EVAL_FILENAME).write_text(json.dumps(evaluation, indent=1))
        print(json.dumps({k: v for k, v in evaluation.items() if k not in ("math_failures", "examples")}, indent=1))
    if args.step in ("package", "all"):
        if train_seconds is None and (args.run_dir / "train_seconds.json").is_file():
            train_seconds = json.loads((args.run_dir / "train_seconds.json").read_text())["train_seconds"]
        print(f"shipped {package(args.run_dir, args.ship_dir, train_seconds=train_seconds)}")
