"""Evaluation: GSM8K exact match, HumanEval pass@1, traps, distractor similarity, perplexity and resources;
the :class:`Evaluator` that runs them in ``trainer.test`` for any LightningModule holding a causal LM
(:mod:`lit_prune.eval.evaluator`), the suite of metrics (:mod:`lit_prune.eval.suite`), the reference-output cache
(:class:`OutputCache`) and the reports (:mod:`lit_prune.eval.report`, :mod:`lit_prune.eval.sweep_report`).

Metrics follow "Exploring the Limits of Pruning: Task-Specific Neurons, Model Collapse, and Recovery in
Task-Specific LLMs" (arXiv 2604.27115), Sec. 3.5, 4.7, 4.8 and Appendices D-G. Count-based metrics are
:class:`torchmetrics.Metric` subclasses whose states are summed across processes.

The names below are imported from their submodule on first use (PEP 562), so that
``import lit_prune.eval.resources`` does not also load generation, torchmetrics and HumanEval.
"""

import importlib

_EXPORTS = {
    "BoxedAnswerStoppingCriteria": "lit_prune.eval.generation",
    "DEFAULT_BERTSCORE_MODEL": "lit_prune.eval.similarity",
    "DEFAULT_SBERT_MODEL": "lit_prune.eval.similarity",
    "EvalSettings": "lit_prune.eval.suite",
    "EvaluationSuite": "lit_prune.eval.suite",
    "Evaluator": "lit_prune.eval.evaluator",
    "Subject": "lit_prune.eval.evaluator",
    "evaluate": "lit_prune.eval.evaluator",
    "print_comparison": "lit_prune.eval.report",
    "write_sweep_report": "lit_prune.eval.sweep_report",
    "nll_standard_error": "lit_prune.eval.perplexity",
    "paired_nll_difference": "lit_prune.eval.perplexity",
    "GSM8KExactMatch": "lit_prune.eval.gsm8k",
    "GSM8K_INSTRUCTION": "lit_prune.eval.gsm8k",
    "GenerationRecord": "lit_prune.eval.generation",
    "HUMANEVAL_INSTRUCTION": "lit_prune.eval.humaneval",
    "HumanEvalPassAtOne": "lit_prune.eval.humaneval",
    "IGNORE_INDEX": "lit_prune.eval.perplexity",
    "LoopInfo": "lit_prune.eval.traps",
    "OutputCache": "lit_prune.eval.similarity",
    "PeakMemory": "lit_prune.eval.resources",
    "TokenNLL": "lit_prune.eval.perplexity",
    "TrapRate": "lit_prune.eval.traps",
    "TrapType": "lit_prune.eval.traps",
    "bertscore_f1": "lit_prune.eval.similarity",
    "classify_trap": "lit_prune.eval.traps",
    "compression_ratio": "lit_prune.eval.resources",
    "count_parameters": "lit_prune.eval.resources",
    "decode_throughput": "lit_prune.eval.resources",
    "default_humaneval_path": "lit_prune.eval.humaneval",
    "default_sbert_path": "lit_prune.eval.similarity",
    "distractor_similarity": "lit_prune.eval.similarity",
    "extract_last_boxed": "lit_prune.eval.gsm8k",
    "find_repetition_loop": "lit_prune.eval.traps",
    "generate": "lit_prune.eval.generation",
    "is_exact_match": "lit_prune.eval.gsm8k",
    "load_humaneval": "lit_prune.eval.humaneval",
    "normalize_answer": "lit_prune.eval.gsm8k",
    "performance_retention": "lit_prune.eval.resources",
    "perplexity_batch": "lit_prune.eval.perplexity",
    "prefill_throughput": "lit_prune.eval.resources",
    "reference_answer": "lit_prune.eval.gsm8k",
    "relative_accuracy_loss": "lit_prune.eval.resources",
    "relative_gain": "lit_prune.eval.resources",
    "run_tests": "lit_prune.eval.humaneval",
    "sanitize_completion": "lit_prune.eval.humaneval",
    "sbert_cosine": "lit_prune.eval.similarity",
    "sbert_embeddings": "lit_prune.eval.similarity",
    "sequence_nll": "lit_prune.eval.perplexity",
    "text_tokens": "lit_prune.eval.perplexity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
