"""Evaluation: GSM8K exact match, HumanEval pass@1, traps, distractor similarity and resources.

Metrics follow "Exploring the Limits of Pruning: Task-Specific Neurons, Model Collapse, and Recovery in
Task-Specific LLMs" (arXiv 2604.27115), Sec. 3.5, 4.7, 4.8 and Appendices D-G. Count-based metrics are
:class:`torchmetrics.Metric` subclasses whose states are summed across processes.
"""

from lit_prune.eval.generation import BoxedAnswerStoppingCriteria, GenerationRecord, generate
from lit_prune.eval.gsm8k import (
    GSM8K_INSTRUCTION,
    GSM8KExactMatch,
    extract_last_boxed,
    is_exact_match,
    normalize_answer,
    reference_answer,
)
from lit_prune.eval.humaneval import (
    HUMANEVAL_INSTRUCTION,
    HumanEvalPassAtOne,
    default_humaneval_path,
    load_humaneval,
    run_tests,
    sanitize_completion,
)
from lit_prune.eval.resources import (
    PeakMemory,
    compression_ratio,
    count_parameters,
    decode_throughput,
    performance_retention,
    prefill_throughput,
    relative_accuracy_loss,
    relative_gain,
)
from lit_prune.eval.similarity import (
    DEFAULT_BERTSCORE_MODEL,
    DEFAULT_SBERT_MODEL,
    OutputCache,
    bertscore_f1,
    default_sbert_path,
    distractor_similarity,
    sbert_cosine,
)
from lit_prune.eval.traps import LoopInfo, TrapRate, TrapType, classify_trap, find_repetition_loop

__all__ = [
    "DEFAULT_BERTSCORE_MODEL",
    "DEFAULT_SBERT_MODEL",
    "GSM8K_INSTRUCTION",
    "HUMANEVAL_INSTRUCTION",
    "BoxedAnswerStoppingCriteria",
    "GSM8KExactMatch",
    "GenerationRecord",
    "HumanEvalPassAtOne",
    "LoopInfo",
    "OutputCache",
    "PeakMemory",
    "TrapRate",
    "TrapType",
    "bertscore_f1",
    "classify_trap",
    "compression_ratio",
    "count_parameters",
    "decode_throughput",
    "default_humaneval_path",
    "default_sbert_path",
    "distractor_similarity",
    "extract_last_boxed",
    "find_repetition_loop",
    "generate",
    "is_exact_match",
    "load_humaneval",
    "normalize_answer",
    "performance_retention",
    "prefill_throughput",
    "reference_answer",
    "relative_accuracy_loss",
    "relative_gain",
    "run_tests",
    "sanitize_completion",
    "sbert_cosine",
]
