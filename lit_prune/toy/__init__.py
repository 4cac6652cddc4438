"""The toy task-specific model: generated tasks and the recipe that trains ``checkpoints/toy-math``.

``python -m lit_prune.toy all`` rebuilds the shipped model from scratch (see :mod:`lit_prune.toy.train`).
"""

from lit_prune.toy.tasks import (
    MathProblem,
    dialogue_examples,
    make_math_problem,
    make_qna_example,
    math_examples,
    qna_examples,
    read_jsonl,
    solve_math_prompt,
    unique_examples,
    write_jsonl,
)
from lit_prune.toy.train import ToyRecipe, evaluate, exact_match, make_config, package, prepare, task_losses, train

__all__ = [
    "MathProblem",
    "ToyRecipe",
    "dialogue_examples",
    "evaluate",
    "exact_match",
    "make_config",
    "make_math_problem",
    "make_qna_example",
    "math_examples",
    "package",
    "prepare",
    "qna_examples",
    "read_jsonl",
    "solve_math_prompt",
    "task_losses",
    "train",
    "unique_examples",
    "write_jsonl",
]
