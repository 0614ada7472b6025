"""MetaKE diagnostics and the maths of the Structural Gradient Proxy (pure, no model).

See ``docs/METAKE.md``. Conventions as in :mod:`methods.solvers`: keys are columns (``K1`` is
``(d_in, n)``), ``W`` is ``(d_out, d_in)``, targets ``V`` and residuals ``R = V - W K1`` are
``(d_out, n)``, a solver is ``Delta = R A`` with ``A`` ``(n, d_in)``, and on the edit keys it
realises ``Delta K1 = R S`` with the realisation operator ``S = A K1`` ``(n, n)``.

Dtypes: the diagnostics compute in the promoted dtype of their inputs, upcast to at least
``float32`` (see :func:`methods.solvers.compute_dtype`), and return that dtype.
:func:`virtual_lookahead` returns the dtype of the hidden states it modifies. Scalar diagnostics
are returned as 0-dim tensors on the inputs' device (call ``.item()`` to record them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.solvers import compute_dtype

__all__ = [
    "alignment",
    "kernel_energy",
    "key_feasibility",
    "proxy_hypergradient",
    "realisation",
    "realisation_operator",
    "virtual_lookahead",
    "z_error",
]


def _cast(*tensors: Tensor) -> list[Tensor]:
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def _check_2d(x: Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")


def realisation_operator(A: Tensor, K1: Tensor) -> Tensor:
    """The realisation operator ``S = A K1``.

    ``A`` ``(n, d_in)`` is a solver's A-matrix, ``K1`` ``(d_in, n)`` the edit keys. Returns
    ``S`` ``(n, n)``: the solver writes ``Delta K1 = R S`` for a residual ``R`` ``(d_out, n)``.
    ``S = I`` means every planned residual is realised (ROME, EMMET); for AlphaEdit with no
    previous keys ``S = G (lam I + G)^-1`` with ``G = K1^T P K1`` (gains < 1). ``S`` is symmetric
    for MEMIT and for AlphaEdit also with previous keys (``P (C P + lam I)^-1 =
    (P C + lam I)^-1 P`` is symmetric for symmetric ``P`` and ``C``), up to rounding.
    """
    _check_2d(A, "A")
    _check_2d(K1, "K1")
    if A.shape[1] != K1.shape[0] or A.shape[0] != K1.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and K1 {tuple(K1.shape)} do not match")
    A, K1 = _cast(A, K1)
    return A @ K1


def key_feasibility(P: Tensor, K: Tensor) -> Tensor:
    """Key feasibility ``phi_i = |P k_i|^2 / |k_i|^2`` per key.

    ``P`` ``(d_in, d_in)`` a projector (AlphaEdit's null-space projector), ``K`` ``(d_in, n)``
    keys as columns (or one key ``(d_in,)``). Returns ``phi`` ``(n,)`` (or a 0-dim tensor) in
    ``[0, 1]``: the fraction of the key's energy that an update confined to ``range(P)`` can
    act on. A zero key gives NaN.
    """
    P, K = _cast(P, K)
    return (P @ K).pow(2).sum(dim=0) / K.pow(2).sum(dim=0)


def realisation(z_post: Tensor, z0: Tensor, v: Tensor) -> Tensor:
    """Realisation ``rho_i = <z_post_i - z0_i, v_i - z0_i> / |v_i - z0_i|^2`` per edit.

    ``z_post`` (hidden state after the real write), ``z0`` (before), ``v`` (target): all
    ``(d, n)`` with edits as columns, or ``(d,)`` for one edit. Returns ``rho`` ``(n,)`` (or
    0-dim): 1 when the target is reached along its direction, 0 when nothing moved. Division by
    ``|v - z0| = 0`` gives NaN/Inf.
    """
    z_post, z0, v = _cast(z_post, z0, v)
    want = v - z0
    return ((z_post - z0) * want).sum(dim=0) / want.pow(2).sum(dim=0)


def z_error(z_post: Tensor, z0: Tensor, v: Tensor) -> Tensor:
    """Relative target error ``e_i = |z_post_i - v_i| / |v_i - z0_i|`` per edit.

    Shapes as in :func:`realisation`: ``(d, n)`` -> ``(n,)`` (or ``(d,)`` -> 0-dim). 0 when the
    target is hit, 1 when nothing moved. Division by ``|v - z0| = 0`` gives NaN/Inf.
    """
    z_post, z0, v = _cast(z_post, z0, v)
    return torch.linalg.vector_norm(z_post - v, dim=0) / torch.linalg.vector_norm(v - z0, dim=0)


def _fraction(part: Tensor, whole: Tensor) -> Tensor:
    """``|part|_F / |whole|_F`` clipped to ``[0, 1]`` (``part`` is a projection of ``whole``, so
    values above 1 are rounding, seen at ~3e-5 in float32 at n = 200); NaN when ``whole`` is 0."""
    den = torch.linalg.matrix_norm(whole)
    num = torch.linalg.matrix_norm(part)
    if bool(den == 0):
        return torch.full((), float("nan"), dtype=den.dtype, device=den.device)
    return (num / den).clamp(max=1.0)


def alignment(R: Tensor, S: Tensor, tau: float = 0.5) -> Tensor:
    """Alignment ``a(R) = |R Pi_tau|_F / |R|_F`` of a residual with what the solver realises.

    ``R`` ``(d_out, n)``, ``S`` ``(n, n)`` the realisation operator. ``Pi_tau`` ``(n, n)`` is
    the orthogonal projector onto the eigenvectors of the symmetric part ``(S + S^T) / 2`` with
    eigenvalue (gain) ``>= tau`` (for MEMIT and AlphaEdit ``S`` is symmetric already, so this
    only removes rounding asymmetry).
    Returns a 0-dim tensor in ``[0, 1]``; NaN when ``R = 0``.
    """
    _check_2d(R, "R")
    _check_2d(S, "S")
    if S.shape[0] != S.shape[1] or R.shape[1] != S.shape[0]:
        raise ValueError(f"R {tuple(R.shape)} must be (d_out, n) and S {tuple(S.shape)} (n, n)")
    R, S = _cast(R, S)
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.mT))
    U = evecs[:, evals >= tau]
    return _fraction(R @ U, R)  # |R U U^T|_F = |R U|_F since U has orthonormal columns


def kernel_energy(R: Tensor, S: Tensor, tol: float = 1e-6) -> Tensor:
    """Kernel energy ``|R N|_F / |R|_F``: the share of the residual the solver annihilates.

    ``R`` ``(d_out, n)``, ``S`` ``(n, n)``. ``N`` ``(n, n)`` is the orthogonal projector onto the
    directions ``u`` of edit space with ``u^T S = 0`` (so ``R N S = 0``: the part of the planned
    residual that is never realised), spanned by the left singular vectors of ``S`` with
    singular value ``<= tol * max singular value``. For symmetric ``S`` (no previous keys) this
    is ``ker S``, the eigenvectors with ``|s| <= tol * max|s|``. Returns 0 when that subspace is
    empty, NaN when ``R = 0``; 0-dim tensor.
    """
    _check_2d(R, "R")
    _check_2d(S, "S")
    if S.shape[0] != S.shape[1] or R.shape[1] != S.shape[0]:
        raise ValueError(f"R {tuple(R.shape)} must be (d_out, n) and S {tuple(S.shape)} (n, n)")
    R, S = _cast(R, S)
    U, sv, _ = torch.linalg.svd(S)
    Nb = U[:, sv <= tol * sv.max()]
    return _fraction(R @ Nb, R)


def proxy_hypergradient(
    grad_delta: Tensor, A: Tensor, V: Tensor, V0: Tensor, gamma: float
) -> Tensor:
    """Hypergradient of the upper objective through the linear solver (structural proxy).

    With ``Delta(V) = (V - W K1) A`` (``A`` held fixed) and
    ``L_up(V) = L(W + Delta(V)) + gamma |V - V0|_F^2``, the chain rule gives
    ``grad_V L_up = grad_Delta L  A^T + 2 gamma (V - V0)``.
    ``grad_delta`` ``(d_out, d_in)``, ``A`` ``(n, d_in)``, ``V``, ``V0`` ``(d_out, n)``.
    Returns ``grad_V`` ``(d_out, n)``.
    """
    _check_2d(grad_delta, "grad_delta")
    _check_2d(A, "A")
    if grad_delta.shape[1] != A.shape[1] or V.shape != (grad_delta.shape[0], A.shape[0]):
        raise ValueError(
            f"shape mismatch: grad_delta {tuple(grad_delta.shape)} (d_out, d_in), "
            f"A {tuple(A.shape)} (n, d_in), V {tuple(V.shape)} (d_out, n)"
        )
    if V0.shape != V.shape:
        raise ValueError(f"V0 {tuple(V0.shape)} must have V's shape {tuple(V.shape)}")
    grad_delta, A, V, V0 = _cast(grad_delta, A, V, V0)
    return grad_delta @ A.mT + 2.0 * gamma * (V - V0)


def virtual_lookahead(h: Tensor, keys: Tensor, V: Tensor, Z0: Tensor, A: Tensor) -> Tensor:
    """MetaKE's virtual look-ahead: the layer output as the solver would leave it.

    Every token state becomes ``h_j + (V - Z0) A k_j``, i.e. ``h + keys @ ((V - Z0) A)^T``.
    ``h`` ``(..., d_out)`` token states (outputs of the edited matrix), ``keys`` ``(..., d_in)``
    the same tokens' keys (inputs of the edited matrix), ``V``, ``Z0 = W K1`` ``(d_out, n)``,
    ``A`` ``(n, d_in)``. The update ``Delta = (V - Z0) A`` ``(d_out, d_in)`` is formed in the
    computation dtype (at least float32), the sum in the wider of that and ``h``'s dtype; the
    result is differentiable in ``V`` and has ``h``'s shape and dtype.
    """
    if h.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"h {tuple(h.shape)} and keys {tuple(keys.shape)} differ in tokens")
    if V.shape != Z0.shape or V.ndim != 2 or A.ndim != 2:
        raise ValueError(f"V {tuple(V.shape)}, Z0 {tuple(Z0.shape)} must be (d_out, n)")
    if V.shape[1] != A.shape[0] or A.shape[1] != keys.shape[-1] or V.shape[0] != h.shape[-1]:
        raise ValueError(
            f"shape mismatch: h {tuple(h.shape)}, keys {tuple(keys.shape)}, "
            f"V {tuple(V.shape)}, A {tuple(A.shape)}"
        )
    V, Z0, A = _cast(V, Z0, A)
    delta = (V - Z0) @ A  # (d_out, d_in)
    out_dtype = torch.promote_types(h.dtype, delta.dtype)
    shift = keys.to(delta.dtype) @ delta.mT  # (..., d_out)
    return (h.to(out_dtype) + shift.to(out_dtype)).to(h.dtype)
