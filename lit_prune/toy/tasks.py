"""Seeded generators of the toy model's tasks, written as generic JSONL examples.

* ``math`` (the target): GSM8K-style arithmetic word problems with two or three numbers and ``+``, ``-``
  and ``*`` (small multipliers). The response is a short chain of reasoning, one equation per step,
  ending with the final answer in ``\\boxed{}``; every intermediate value and the answer are
  non-negative.
* ``qna`` (distractor 1): a short generated passage of facts about two people (city, colour, object,
  year) and a question whose answer is copied from the passage, in the SQuAD prompt layout.
* ``dialogue`` (distractor 2): the next turn of a DailyDialog conversation, from the shared copies
  of the data set read at run time (``../shared/data/dailydialog/*.txt``).

Every record is ``{"prompt", "response", "kind", "answer"}``, the generic format read by
:func:`lit_prune.data.load_examples`. Generators take a seed and use their own ``random.Random``,
so the same seed gives the same examples on every machine.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lit_prune.jsonl import read_jsonl, write_jsonl  # re-exported: the toy recipe writes its data sets with them

__all__ = [
    "MathProblem",
    "dialogue_examples",
    "make_math_problem",
    "make_qna_example",
    "math_examples",
    "qna_examples",
    "read_jsonl",
    "solve_math_prompt",
    "unique_examples",
    "write_jsonl",
]

log = logging.getLogger(__name__)

_NAMES = [
    ("Tom", "he", "his", "him"), ("Anna", "she", "her", "her"), ("Ben", "he", "his", "him"),
    ("Lily", "she", "her", "her"), ("Sam", "he", "his", "him"), ("Mia", "she", "her", "her"),
    ("Jack", "he", "his", "him"), ("Emma", "she", "her", "her"), ("Leo", "he", "his", "him"),
    ("Zoe", "she", "her", "her"), ("Max", "he", "his", "him"), ("Ella", "she", "her", "her"),
    ("Noah", "he", "his", "him"), ("Ava", "she", "her", "her"), ("Omar", "he", "his", "him"),
    ("Sara", "she", "her", "her"), ("Ivan", "he", "his", "him"), ("Nina", "she", "her", "her"),
    ("Ravi", "he", "his", "him"), ("Kate", "she", "her", "her"),
]
_OBJECTS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "stamps", "shells",
            "coins", "eggs", "balloons", "candies", "toys", "flowers", "beads", "rocks", "cupcakes"]
_CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs", "trays"]

# One sentence per operation; {b} is the operand, {n} the name, {p}/{q}/{o} the pronoun forms, {x} the objects.
_ADD = [
    "{P} buys {b} more.",
    "{F} gives {o} {b} more.",
    "{P} finds {b} more {x}.",
    "Then {p} gets {b} more {x}.",
    "{P} wins {b} more at the fair.",
]
_SUB = [
    "{P} gives {b} to {F}.",
    "{P} loses {b} of them.",
    "{P} sells {b} {x}.",
    "Then {p} gives away {b}.",
    "{F} takes {b} of them.",
]
_MUL = [
    "Then {p} gets {b} times as many {x}.",
    "{P} multiplies {q} {x} by {b}.",
]
_START = [
    "{n} has {a} {x}.",
    "{n} starts with {a} {x}.",
    "There are {a} {x} in {n}'s room.",
]
_START_GROUPS = [
    "{n} has {a} {c} with {b} {x} in each.",
    "{n} buys {a} {c} of {x}. Each one holds {b} {x}.",
]
_QUESTIONS = [
    "How many {x} does {n} have now?",
    "How many {x} does {n} have in the end?",
    "How many {x} are left with {n}?",
]
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}

_CITIES = ["Paris", "Cairo", "Lima", "Oslo", "Tokyo", "Rome", "Delhi", "Berlin", "Madrid", "Seoul", "Dublin",
           "Vienna", "Nairobi", "Lisbon", "Quito", "Hanoi", "Prague", "Athens", "Boston", "Sydney"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey"]
_THINGS = ["a bicycle", "a piano", "a guitar", "a red car", "a small boat", "a camera", "a violin", "a kite",
           "a telescope", "a sewing machine", "a horse", "a laptop", "a drum", "a tent"]
_JOBS = ["a teacher", "a doctor", "a baker", "a pilot", "a farmer", "a nurse", "a painter", "a chef", "a driver",
         "an engineer", "a writer", "a singer"]
# fact -> (sentence stating it, question asking for it)
_FACTS = {
    "city": ("{n} lives in {v}.", "Where does {n} live?"),
    "colour": ("{n}'s favourite colour is {v}.", "What is {n}'s favourite colour?"),
    "thing": ("{n} owns {v}.", "What does {n} own?"),
    "year": ("{n} was born in {v}.", "In which year was {n} born?"),
    "job": ("{n} works as {v}.", "What does {n} work as?"),
}
_FACT_VALUES = {"city": _CITIES, "colour": _COLOURS, "thing": _THINGS, "job": _JOBS}

_QNA_INSTRUCTION = "Answer the question from the passage."
_MAX_VALUE = 9  # largest number in a math problem, intermediate results included
_DAILYDIALOG_SPLITS = ("validation.txt", "test.txt")


@dataclass(frozen=True)
class MathProblem:
    """One generated word problem.

    Attributes:
        prompt: The question.
        steps: The equations ``(left, op, right, result)`` in order.
        answer: The final value.
        opening: Text of the response before the first equation (e.g. the starting amount).
    """

    prompt: str
    steps: tuple[tuple[int, str, int, int], ...]
    answer: int
    opening: str = ""

    @property
    def response(self) -> str:
        """The reference chain of reasoning: one equation per step, then the boxed answer."""
        equations = " ".join(f"{left} {op} {right} = {result}." for left, op, right, result in self.steps)
        return f"{self.opening}{equations} The answer is \\boxed{{{self.answer}}}."

    def to_record(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "kind": "math", "answer": str(self.answer)}


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_math_problem(rng: random.Random) -> MathProblem:
    """Draw one arithmetic word problem with two or three numbers (one or two operations)."""
    name, subject, possessive, objective = rng.choice(_NAMES)
    friend = rng.choice([n for n, *_ in _NAMES if n != name])
    objects = rng.choice(_OBJECTS)
    fields = {"n": name, "p": subject, "P": _capitalised(subject), "q": possessive, "o": objective,
              "F": friend, "x": objects}
    num_ops = rng.choice([1, 2, 2])
    sentences: list[str] = []
    steps: list[tuple[int, str, int, int]] = []
    opening = ""
    # Every number and every intermediate result stays in 0..9: Qwen's tokenizer writes one token per digit,
    # and a 4-layer model trained for minutes on CPU learns single-digit facts but not carries (18% held-out
    # exact match with numbers up to 50 after 1,500 steps).
    if rng.random() < 0.2:  # groups: a containers of b objects
        a = rng.randint(2, 4)
        b = rng.randint(2, _MAX_VALUE // a)
        sentences.append(rng.choice(_START_GROUPS).format(a=a, b=b, c=rng.choice(_CONTAINERS), **fields))
        value = a * b
        steps.append((a, "*", b, value))
        num_ops -= 1
    else:
        value = rng.randint(2, _MAX_VALUE)
        sentences.append(rng.choice(_START).format(a=value, **fields))
        opening = f"{name} starts with {value} {objects}. "
    for _ in range(num_ops):
        choices = [op for op, allowed in (("add", value < _MAX_VALUE), ("sub", value >= 1),
                                          ("mul", 2 <= value <= _MAX_VALUE // 2)) if allowed]
        op = rng.choices(choices, weights=[{"add": 4, "sub": 4, "mul": 1}[c] for c in choices])[0]
        if op == "add":
            b = rng.randint(1, _MAX_VALUE - value)
            result = value + b
        elif op == "sub":
            b = rng.randint(1, value)
            result = value - b
        else:
            b = rng.randint(2, _MAX_VALUE // value)
            result = value * b
        sentences.append(rng.choice({"add": _ADD, "sub": _SUB, "mul": _MUL}[op]).format(b=b, **fields))
        steps.append((value, _SYMBOLS[op], b, result))
        value = result
    sentences.append(rng.choice(_QUESTIONS).format(**fields))
    return MathProblem(" ".join(sentences), tuple(steps), value, opening)


def solve_math_prompt(prompt: str) -> int:
    """Recompute a generated problem's answer from its text alone (an independent check of the generator).

    Raises:
        ValueError: If a sentence matches none of the templates.
    """
    value: int | None = None
    for sentence in re.findall(r"[^.?]+[.?]", prompt):
        sentence = sentence.strip()
        numbers = [int(n) for n in re.findall(r"\d+", sentence)]
        if sentence.startswith("How many"):
            continue
        if "in each" in sentence:
            value = numbers[0] * numbers[1]
        elif value is None:
            value = numbers[0]
        elif any(words in sentence for words in ("Each one holds", "times as many", "multiplies")):
            value *= numbers[0]
        elif any(words in sentence for words in (" more", "gets ")):
            value += numbers[0]
        elif any(words in sentence for words in ("gives", "loses", "sells", "takes")):
            value -= numbers[0]
        else:
            raise ValueError(f"no template matches {sentence!r}")
    if value is None:
        raise ValueError(f"no starting number in {prompt!r}")
    return value


def make_qna_example(rng: random.Random) -> dict:
    """Draw one passage of facts about two people and a question answered by a span of the passage."""
    first, second = rng.sample([n for n, *_ in _NAMES], 2)
    facts: list[tuple[str, str, str]] = []  # (person, fact, value)
    for person in (first, second):
        for fact in rng.sample(sorted(_FACTS), 2):
            value = str(rng.randint(1950, 2015)) if fact == "year" else rng.choice(_FACT_VALUES[fact])
            facts.append((person, fact, value))
    passage = " ".join(_FACTS[fact][0].format(n=person, v=value) for person, fact, value in facts)
    person, fact, value = rng.choice(facts)
    prompt = f"{_QNA_INSTRUCTION}\nPassage: {passage}\nQuestion: {_FACTS[fact][1].format(n=person)}"
    return {"prompt": prompt, "response": value, "kind": "qna", "answer": value}


def math_examples(count: int, seed: int) -> list[dict]:
    """``count`` math records from ``seed`` (duplicates possible; see :func:`unique_examples`)."""
    rng = random.Random(seed)
    return [make_math_problem(rng).to_record() for _ in range(count)]


def qna_examples(count: int, seed: int) -> list[dict]:
    """``count`` passage-QnA records from ``seed``."""
    rng = random.Random(seed)
    return [make_qna_example(rng) for _ in range(count)]


def unique_examples(records: Iterable[dict], exclude: Iterable[str] = ()) -> list[dict]:
    """Records whose prompt is new: not in ``exclude`` and not seen earlier in ``records``."""
    seen = set(exclude)
    unique = []
    for record in records:
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            unique.append(record)
    return unique


def _dialogue_turns(line: str) -> list[str]:
    return [turn.strip() for turn in line.split("__eou__") if turn.strip()]


def dialogue_examples(path: str | Path, context_turns: int = 2, max_chars: int = 160, limit: int | None = None,
                      seed: int = 0) -> list[dict]:
    """Next-turn examples from a DailyDialog file: every turn after the first, with the turns before it.

    Args:
        path: A DailyDialog ``.txt`` file (one dialogue a line, turns separated by ``__eou__``).
        context_turns: Previous turns kept as the prompt (one per line).
        max_chars: Examples whose prompt or response is longer are skipped (token budget).
        limit: Keep at most this many, drawn with ``seed`` (all when None).
        seed: Seed of the subsample.

    Raises:
        FileNotFoundError: If ``path`` does not exist (the shared data are read at run time).
        ValueError: If ``context_turns`` < 1 or ``max_chars`` < 1.
    """
    if context_turns < 1:
        raise ValueError(f"`context_turns` must be >= 1; got {context_turns}")
    if max_chars < 1:
        raise ValueError(f"`max_chars` must be >= 1; got {max_chars}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DailyDialog file {str(path)!r} not found (expected the shared copy, one of "
                                f"{_DAILYDIALOG_SPLITS} in ../shared/data/dailydialog/)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = _dialogue_turns(line)
        for index in range(1, len(turns)):
            prompt = "\n".join(turns[max(0, index - context_turns):index])
            if len(prompt) <= max_chars and len(turns[index]) <= max_chars:
                records.append({"prompt": prompt, "response": turns[index], "kind": "dialogue", "answer": None})
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    return records
