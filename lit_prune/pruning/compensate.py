"""Output-preserving neuron removal: greedy OBS selection and the least-squares re-fit of ``W_down``.

A SwiGLU MLP's output is ``y = W h`` with ``W = W_down`` (d, d_ff) and ``h`` the intermediate. Removing the
neurons ``P`` and keeping ``K``, the best linear correction of the kept columns on calibration tokens with Gram
matrix ``G = sum_t h_t h_t^T`` minimises ``sum_t ||W h_t - W'_K h_{t,K}||^2``; its closed form is::

    W'_K = W G_{:,K} G_KK^-1 = W_K + W_P G_PK G_KK^-1

(the normal equations; Optimal Brain Surgeon's update, Hassibi & Stork 1993, applied to a whole group). The
error of removing one neuron ``q`` from the current set, with every other column re-fitted, is
``||W_:,q||^2 / [G^-1]_qq``; after removing ``q`` the inverse of the remaining Gram is the rank-one downdate
``G^-1 - G^-1_:,q G^-1_q,: / [G^-1]_qq`` and the weights move by ``- W_:,q G^-1_q,: / [G^-1]_qq`` (Frantar &
Alistarh, "Optimal Brain Compression", 2022, Eq. 3-4 and Alg. 1, with rows and columns transposed: here whole
input columns of ``W`` are removed). :func:`obs_select` removes neurons greedily by that error, ``group_size``
at a time: the group with the smallest errors is removed jointly with the block form of the same update
(``S = [G^-1]_QQ``: ``W -= W_:,Q S^-1 G^-1_Q,:`` and ``G^-1 -= G^-1_:,Q S^-1 G^-1_Q,:``), so a step is a few
matrix products (1 = exact greedy OBS). The Gram matrix is damped by ``damping`` times its mean diagonal,
as GPTQ/SparseGPT do, so that it is invertible when tokens are few or neurons are dead.

The architecture is unchanged (only ``W_down``'s kept columns move), so a compensated export still loads with
plain ``from_pretrained`` and vLLM.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["damped_gram", "obs_select", "refit_down"]

log = logging.getLogger(__name__)


def damped_gram(gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """``G + damping * mean(diag G) * I`` in float64 (a dead neuron's zero row gets the damping alone).

    Raises:
        ValueError: If ``damping`` is negative or ``gram`` is not square.
    """
    if damping < 0:
        raise ValueError(f"`damping` must be >= 0; got {damping}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"the Gram matrix must be square; got shape {tuple(gram.shape)}")
    gram = gram.double()
    mean_diagonal = float(gram.diagonal().mean())
    lam = damping * mean_diagonal if mean_diagonal > 0 else max(damping, 1e-8)
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def refit_down(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """The re-fitted kept columns ``W_K + W_P G_PK G_KK^-1`` of ``weight`` (d, d_ff), float64, shape (d, k).

    Args:
        weight: ``W_down`` before pruning.
        gram: ``sum h h^T`` over calibration tokens (d_ff, d_ff), undamped.
        kept: Kept neuron indices (increasing).
        damping: Relative damping of the Gram matrix (see :func:`damped_gram`).
    """
    g = damped_gram(gram, damping)
    w = weight.double().to(g.device)
    kept = kept.to(g.device)
    mask = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    mask[kept] = False
    pruned = mask.nonzero().flatten()
    if pruned.numel() == 0:
        return w[:, kept].clone()
    g_kk = g[kept][:, kept]
    g_pk = g[pruned][:, kept]
    # Solve G_KK X = G_KP (X = G_KK^-1 G_KP, so (W_P G_PK G_KK^-1) = (X^T W_P^T)^T) by Cholesky.
    factor = torch.linalg.cholesky(g_kk)
    x = torch.cholesky_solve(g_pk.T, factor)  # (k, p)
    return w[:, kept] + w[:, pruned] @ x.T


def obs_select(weight: torch.Tensor, gram: torch.Tensor, keep: int, group_size: int = 32,
               damping: float = 0.01) -> torch.Tensor:
    """Kept neuron indices (sorted) after greedily removing ``d_ff - keep`` neurons by their OBS error.

    Args:
        weight: ``W_down`` (d, d_ff).
        gram: ``sum h h^T`` over calibration tokens (d_ff, d_ff), undamped.
        keep: Neurons to keep.
        group_size: Neurons removed between two updates of the errors (1 = exact greedy OBS).
        damping: Relative damping of the Gram matrix.

    Raises:
        ValueError: If ``keep`` is not in [1, d_ff] or ``group_size`` < 1.
    """
    width = gram.shape[0]
    if not 1 <= keep <= width:
        raise ValueError(f"`keep` must be in [1, {width}]; got {keep}")
    if group_size < 1:
        raise ValueError(f"`group_size` must be >= 1; got {group_size}")
    inverse = torch.linalg.inv(damped_gram(gram, damping))
    w = weight.double().to(inverse.device).clone()
    alive = torch.ones(width, dtype=torch.bool, device=inverse.device)
    to_remove = width - keep
    while to_remove > 0:
        errors = w.pow(2).sum(0) / inverse.diagonal()
        errors[~alive] = float("inf")
        group = torch.topk(errors, min(group_size, to_remove), largest=False).indices
        # Remove the group jointly: the block form of OBS's update, one matmul per step instead of a Python loop.
        rows = inverse[group]  # (g, d_ff)
        block = rows[:, group]  # (g, g), positive definite
        factor = torch.linalg.cholesky(block)
        w -= torch.cholesky_solve(w[:, group].T, factor).T @ rows  # compensate the others for the group
        inverse -= rows.T @ torch.cholesky_solve(rows, factor)  # inverse of the Gram without the group
        alive[group] = False
        inverse[group, group] = 1.0  # their rows/columns are now 0: keep the diagonal positive, never chosen again
        to_remove -= len(group)
    return alive.nonzero().flatten().cpu()
