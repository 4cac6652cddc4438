"""Moved to :mod:`lit_prune.eval.suite`; kept so that Lightning checkpoints written before the move, whose saved
hyper-parameters pickle ``lit_prune.evaluation.EvalSettings``, still load."""

from lit_prune.eval.suite import EvalSettings, EvaluationSuite

__all__ = ["EvalSettings", "EvaluationSuite"]
