"""Examples for capture, fine-tuning and evaluation, from the Hugging Face hub or from local files.

A *source* is either a preset name (the paper's hub data sets) or a local path. Every source yields
:class:`Example` records (a user message, an optional reference response, the task kind) so that the
same sets feed capture (prompts only), LoRA recovery (prompt + response) and evaluation (references).

Presets (hub names as in the paper; need a network the first time, then the local HF cache):

=========================  ===========================================================  ==========
name                       hub data set                                                 kind
=========================  ===========================================================  ==========
``gsm8k``                  ``openai/gsm8k`` config ``main``                             math
``codefeedback``           ``m-a-p/CodeFeedback-Filtered-Instruction`` (Python only)    code
``squad``                  ``rajpurkar/squad``                                          qna
``everyday-conversations`` ``suriya7/everyday-Conversational-cleaned``                  dialogue
=========================  ===========================================================  ==========

Local files (for example the copies in ``../shared/data``): ``*.jsonl`` with GSM8K fields
(``question``/``answer``), MBPP fields (``text``/``code``/``test_list``), HumanEval fields
(``prompt``/``canonical_solution``) or generic ``prompt``/``response`` fields; SQuAD-format ``*.json``;
DailyDialog ``*.txt`` (one dialogue a line, turns separated by ``__eou__``).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lit_prune.jsonl import iter_jsonl

__all__ = ["KINDS", "PRESETS", "Example", "gsm8k_response", "load_examples", "load_texts"]

log = logging.getLogger(__name__)

KINDS = ("math", "code", "qna", "dialogue", "text")


@dataclass(frozen=True)
class Example:
    """One prompt with its reference response.

    Attributes:
        prompt: The user message (no instruction or chat markup; see ``lit_prune.data.prompts``).
        response: Reference answer or continuation, if the source has one.
        kind: The task kind, one of :data:`KINDS`; selects the instruction and the metric.
        answer: Short reference answer for exact match (GSM8K's number after ``####``).
    """

    prompt: str
    response: str | None
    kind: str
    answer: str | None = None


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_response(answer: str) -> str:
    """Turn a GSM8K answer (reasoning, ``<<calc>>`` annotations, ``#### N``) into reasoning + ``\\boxed{N}``.

    Raises:
        ValueError: If ``answer`` has no ``####`` line.
    """
    if "####" not in answer:
        raise ValueError(f"GSM8K answer lacks the '#### <number>' line: {answer[-80:]!r}")
    reasoning, final = answer.rsplit("####", 1)
    reasoning = _CALCULATOR.sub("", reasoning).strip()
    return f"{reasoning}\nThe final answer is \\boxed{{{final.strip()}}}."


def _gsm8k(record: dict) -> Example:
    final = record["answer"].rsplit("####", 1)[-1].strip() if "####" in record["answer"] else None
    return Example(record["question"], gsm8k_response(record["answer"]), "math", final)


def _mbpp(record: dict) -> Example:
    tests = "\n".join(record.get("test_list", [])[:1])
    prompt = f"{record['text']}\nYour code should pass this test:\n{tests}" if tests else record["text"]
    return Example(prompt, f"```python\n{record['code'].strip()}\n```", "code")


def _humaneval(record: dict) -> Example:
    return Example(record["prompt"], record["prompt"] + record["canonical_solution"], "code")


def _generic(record: dict) -> Example:
    return Example(record["prompt"], record.get("response"), record.get("kind", "text"), record.get("answer"))


def _codefeedback(record: dict) -> Example:
    return Example(record["query"], record["answer"], "code")


def _squad_record(record: dict) -> Example:
    answers = record["answers"]["text"]
    return Example(_squad_prompt(record["context"], record["question"]), answers[0] if answers else None, "qna")


def _squad_prompt(context: str, question: str) -> str:
    return f"Answer the question from the passage.\nPassage: {context}\nQuestion: {question}"


def _conversation(record: dict) -> Example:
    """A dialogue row: a list of turns (``conversations``/``messages`` with from/value or role/content),
    a prompt/response pair under common names, or one text with one turn a line."""
    turns = record.get("conversations") or record.get("messages")
    if isinstance(turns, list) and turns:
        texts = [t.get("value") or t.get("content") or "" for t in turns if isinstance(t, dict)]
    else:
        for prompt_key, response_key in (("input", "output"), ("question", "answer"), ("prompt", "response")):
            if record.get(prompt_key):
                return Example(str(record[prompt_key]), record.get(response_key), "dialogue")
        text = str(record.get("text") or record.get("conversation") or "")
        texts = [p.strip() for p in re.split(r"\n+", text) if p.strip()]
    if not texts:
        raise ValueError(f"dialogue record has no turns; keys {sorted(record)}")
    if len(texts) == 1:
        return Example(texts[0], None, "dialogue")
    return Example("\n".join(texts[:-1][-4:]), texts[-1], "dialogue")


# name -> (hub path, hub config, default split, record converter, row filter)
PRESETS = {
    "gsm8k": ("openai/gsm8k", "main", "train", _gsm8k, None),
    "codefeedback": ("m-a-p/CodeFeedback-Filtered-Instruction", None, "train", _codefeedback,
                     lambda r: str(r.get("lang", "")).lower() == "python"),
    "squad": ("rajpurkar/squad", None, "train", _squad_record, None),
    "everyday-conversations": ("suriya7/everyday-Conversational-cleaned", None, "train", _conversation, None),
}

_JSONL_FORMATS = (
    (("question", "answer"), _gsm8k),
    (("text", "code"), _mbpp),
    (("prompt", "canonical_solution"), _humaneval),
    (("prompt",), _generic),
)


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    for line_number, record in iter_jsonl(path):
        for keys, convert in _JSONL_FORMATS:
            if all(k in record for k in keys):
                examples.append(convert(record))
                break
        else:
            raise ValueError(
                f"{path}: line {line_number} is an unknown record with keys {sorted(record)}; expected GSM8K "
                "(question, answer), MBPP (text, code), HumanEval (prompt, canonical_solution) or "
                "(prompt[, response])"
            )
    return examples


def _read_squad(path: Path) -> list[Example]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a SQuAD-format file with a top-level 'data' list ({error})") from error
    examples = []
    for article in data:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers:  # SQuAD 2.0 unanswerable questions have no reference to compare with
                    examples.append(Example(_squad_prompt(paragraph["context"], qa["question"]), answers[0], "qna"))
    return examples


def _read_dialogues(path: Path) -> list[Example]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = [t.strip() for t in line.split("__eou__") if t.strip()]
        if len(turns) >= 2:
            context = "\n".join(turns[:-1][-4:])  # the last few turns are enough context for the next one
            examples.append(Example(context, turns[-1], "dialogue"))
    return examples


def _load_hub(name: str, split: str | None) -> list[Example]:
    from datasets import load_dataset

    hub_path, config, default_split, convert, keep = PRESETS[name]
    dataset = load_dataset(hub_path, config, split=split or default_split)
    return [convert(row) for row in dataset if keep is None or keep(row)]


def load_examples(source: str, split: str | None = None, limit: int | None = None, seed: int = 42) -> list[Example]:
    """Load examples from a preset name or a local file.

    Args:
        source: A name in :data:`PRESETS` or a path to a local file (see the module docstring).
        split: Hub split for presets (each preset has a default); ignored for local files.
        limit: Keep at most this many examples, drawn at random with ``seed`` (all when None).
        seed: Seed of the subsample.

    Raises:
        FileNotFoundError: If ``source`` is neither a preset nor an existing file.
        ValueError: If the file is malformed (the message names the file and line), has no usable
            examples, or ``limit`` < 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be >= 1 or None; got {limit}")
    if source in PRESETS:
        examples = _load_hub(source, split)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data source {source!r} is neither a preset {sorted(PRESETS)} nor an existing file")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            examples = _read_jsonl(path)
        elif suffix == ".json":
            examples = _read_squad(path)
        elif suffix == ".txt":
            examples = _read_dialogues(path)
        else:
            raise ValueError(f"data source {source!r}: unsupported file type {suffix!r}; use .jsonl, .json or .txt")
    if not examples:
        raise ValueError(f"data source {source!r} yielded no examples")
    if limit is not None and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    return examples


def _texts_from_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".json":  # SQuAD: each paragraph once (the file repeats it for every question)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))["data"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a SQuAD-format file with a top-level 'data' list ({error})") from error
        return list(dict.fromkeys(p["context"] for article in data for p in article["paragraphs"]))
    if suffix == ".txt":  # one text a line; DailyDialog's `__eou__` turn marks become line breaks
        texts = ("\n".join(t.strip() for t in line.split("__eou__") if t.strip())
                 for line in path.read_text(encoding="utf-8").splitlines())
        return [text for text in texts if text]
    if suffix == ".jsonl":
        texts = []
        for line_number, record in iter_jsonl(path):
            if isinstance(record.get("text"), str):
                texts.append(record["text"])
            else:
                raise ValueError(f"{path}: line {line_number} has no string `text` field (keys {sorted(record)})")
        return texts
    raise ValueError(f"text source {str(path)!r}: unsupported file type {suffix!r}; use .json (SQuAD), .txt or .jsonl")


def load_texts(source: str, limit: int | None = None, seed: int = 42) -> list[str]:
    """Plain texts (no prompt, no template) for general-text perplexity.

    Args:
        source: A SQuAD-format ``.json`` (its paragraphs, each once), a ``.txt`` file (one text a line; DailyDialog's
            ``__eou__`` become line breaks), a ``.jsonl`` file with a ``text`` field, or the ``squad`` preset
            (paragraphs of its validation split).
        limit: Keep at most this many texts, drawn at random with ``seed`` (all when None).
        seed: Seed of the subsample.

    Raises:
        FileNotFoundError: If ``source`` is neither the ``squad`` preset nor an existing file.
        ValueError: If the file is malformed or has no text, or ``limit`` < 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be >= 1 or None; got {limit}")
    if source == "squad":
        from datasets import load_dataset

        texts = list(dict.fromkeys(load_dataset(PRESETS["squad"][0], split="validation")["context"]))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text source {source!r} is neither the `squad` preset nor an existing file")
        texts = _texts_from_file(path)
    if not texts:
        raise ValueError(f"text source {source!r} yielded no texts")
    if limit is not None and limit < len(texts):
        texts = random.Random(seed).sample(texts, limit)
    return texts
