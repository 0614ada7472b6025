"""Pure post-hoc regularisers of an edit's weight change (PRUNE, RECT).

No model, no I/O: tensors in, tensors out. Conventions as in :mod:`methods.solvers`: an edited
weight ``W`` and its change ``Delta`` are ``(d_out, d_in)``.

* PRUNE (Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025): the
  singular values of the accumulated edit ``Delta = W_edited - W_0`` that exceed the largest
  singular value ``s_max`` of the unedited ``W_0`` are replaced by
  ``F(s) = log_alpha(s) - log_alpha(s_max) + s_max``; the others and all singular vectors are
  kept (:func:`prune_restrain`, :func:`restrain_singular_values`).
* RECT (Gu et al., "Model Editing Harms General Abilities of Large Language Models:
  Regularization to the Rescue", EMNLP 2024): of an update ``Delta`` to ``W`` only the entries
  with the largest relative change ``|Delta_ij / (W_ij + eps)|`` are kept, the top ``k`` per cent;
  the rest are set to zero (:func:`top_k_relative_mask`, :func:`rect_sparsify`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["prune_restrain", "rect_sparsify", "restrain_singular_values",
           "top_k_relative_mask"]


def prune_restrain(s: Tensor, bound: float, alpha: float = math.e) -> Tensor:
    """PRUNE's restraint function applied to singular values ``s`` ``(r,)``.

    ``F(s) = s`` for ``s < bound``; ``F(s) = log(s)/log(alpha) - log(bound)/log(alpha) + bound``
    for ``s >= bound``. ``bound`` is the largest singular value of the unedited weight,
    ``alpha > 1`` the base of the logarithm (``e`` in AlphaEdit's PRUNE baseline; PRUNE's code
    also offers 2, 1.5 and 1.2). ``F`` is continuous and increasing, ``F(s) <= s``, and maps
    ``[bound, inf)`` onto ``[bound, inf)`` with slope ``1 / (s ln alpha) < 1`` there.
    Returns a tensor like ``s``.
    """
    if not alpha > 1.0:
        raise ValueError(f"alpha must be > 1, got {alpha}")
    if not bound > 0.0:
        raise ValueError(f"bound must be > 0, got {bound}")
    big = s >= bound
    log_a = math.log(alpha)
    safe = torch.where(big, s, torch.full_like(s, bound))  # no log of 0 in the unused branch
    restrained = torch.log(safe) / log_a - math.log(bound) / log_a + bound
    return torch.where(big, restrained, s)


def restrain_singular_values(delta: Tensor, bound: float, alpha: float = math.e
                             ) -> tuple[Tensor, int]:
    """``Delta' = Delta + U_b diag(F(s_b) - s_b) V_b^T`` for the singular triplets of ``Delta``
    ``(d_out, d_in)`` with ``s >= bound`` (:func:`prune_restrain`): equal to
    ``U diag(F(s)) V^T``, with the part of ``Delta`` below the bound kept bit for bit.
    Computed in float64 (or the input's dtype if wider). Returns (``Delta'`` in that dtype,
    the number of restrained singular values)."""
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("delta contains NaN or Inf entries")
    D = delta.to(torch.promote_types(delta.dtype, torch.float64))
    U, s, Vh = torch.linalg.svd(D, full_matrices=False)
    big = s >= bound
    n = int(big.sum())
    if n == 0:
        return D, 0
    change = prune_restrain(s[big], bound, alpha) - s[big]  # (n,), <= 0
    return D + (U[:, big] * change) @ Vh[big], n


def top_k_relative_mask(delta: Tensor, W: Tensor, keep_fraction: float,
                        eps: float = 1e-8) -> Tensor:
    """Boolean mask ``(d_out, d_in)`` of the ``ceil(keep_fraction * N)`` entries of ``delta``
    with the largest relative change ``|delta_ij / (W_ij + eps)|`` (``N = d_out * d_in``; ``W``
    the weight before the update, same shape). Ties at the threshold are broken by
    ``torch.topk``'s order. (AlphaEdit's MEMIT_rect keeps ``N - floor((1 - k) N) + 1``
    entries, i.e. one or two more, through a ``>=`` on the ``kthvalue``.)"""
    if delta.shape != W.shape or delta.ndim != 2:
        raise ValueError(f"delta {tuple(delta.shape)} and W {tuple(W.shape)} must be the "
                         "same 2-D shape")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    rel = (delta.double() / (W.double() + eps)).abs().reshape(-1)
    n_keep = min(rel.numel(), math.ceil(keep_fraction * rel.numel() - 1e-9))
    mask = torch.zeros(rel.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(rel, n_keep, sorted=False).indices] = True
    return mask.view(delta.shape)


def rect_sparsify(delta: Tensor, W: Tensor, keep_fraction: float, eps: float = 1e-8
                  ) -> Tensor:
    """RECT: ``delta * M`` with ``M`` :func:`top_k_relative_mask` (same shape and dtype)."""
    return delta * top_k_relative_mask(delta, W, keep_fraction, eps).to(delta.dtype)
