"""Pure closed-form solvers for locate-then-edit knowledge editing.

No model, no I/O: every function maps tensors to tensors. Conventions (see ``docs/DESIGN.md``):

* keys are **columns**: ``K1`` is ``(d_in, n)`` (one column per edit), a single key ``k`` is
  ``(d_in,)``;
* an edited weight ``W`` is ``(d_out, d_in)`` so that the layer computes ``W k``;
* a residual ``R = V - W K1`` is ``(d_out, n)``; an update ``Delta`` is ``(d_out, d_in)``;
* ``C0`` is the ``(d_in, d_in)`` second moment of keys over a corpus ("layer stats"); ``P`` is a
  ``(d_in, d_in)`` orthogonal projector.

Every solver is linear in the residual and is written as ``Delta = R @ A`` with an "A-matrix"
``A`` of shape ``(n, d_in)`` that depends only on the keys and the statistics. The ``*_A``
functions return ``A``; the ``*_update`` functions return ``R @ A``. On the edit keys the solver
realises ``Delta K1 = R S`` with ``S = A K1`` (``(n, n)``, see :mod:`methods.alignment`).

Numerics: no explicit inverses. Symmetric positive-definite systems are solved with a Cholesky
factorisation (``torch.linalg.cholesky_ex`` + ``torch.cholesky_solve``), falling back to an LU
solve (``torch.linalg.solve``) when the factorisation fails; general systems use
``torch.linalg.solve``.

Dtype and device: inputs may live on any device (all on the same one). The computation runs in
the promoted floating dtype of the inputs, upcast to at least ``float32`` (``bfloat16`` /
``float16`` inputs are upcast, because the factorisations are not implemented or not accurate in
half precision), and results are returned in that computation dtype: ``float32`` in ->
``float32`` out, ``float64`` in -> ``float64`` out, ``bfloat16`` in -> ``float32`` out. The
caller casts an update to the weight's dtype when it writes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NumericalError",
    "alphaedit_A",
    "alphaedit_update",
    "compute_dtype",
    "emmet_A",
    "emmet_update",
    "lifelong_normalize",
    "lifelong_stats_update",
    "memit_A",
    "memit_update",
    "nullspace_projector",
    "rome_A",
    "rome_update",
    "select_neurons",
    "spread_residual",
    "subspace_memit_A",
    "ultraedit_A",
    "ultraedit_values",
]


class NumericalError(ValueError):
    """Raised when an input or an intermediate result is numerically unusable.

    Examples: a statistics matrix with NaN/Inf entries, a covariance with significantly negative
    eigenvalues, or a singular system that a closed form needs to solve.
    """


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """Return the dtype the solvers compute in for these inputs.

    The promoted dtype of all non-``None`` tensors, upcast to ``float32`` when it is a half
    precision or non-floating dtype. ``float64`` stays ``float64``.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.get_default_dtype()
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype.is_complex:
        raise TypeError(f"complex tensors are not supported (got {dtype})")
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _prepare(*tensors: Tensor) -> list[Tensor]:
    """Cast tensors to their common computation dtype (:func:`compute_dtype`); check one device."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def _check_shape(x: Tensor, name: str, ndim: int) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _check_square(x: Tensor, name: str, size: int | None = None) -> None:
    _check_shape(x, name, 2)
    if x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(x.shape)}")
    if size is not None and x.shape[0] != size:
        raise ValueError(f"{name} must be ({size}, {size}), got shape {tuple(x.shape)}")


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{name} contains NaN or Inf entries")


def _symmetrise(M: Tensor) -> Tensor:
    """``(M + M^T) / 2`` for a square ``(d, d)`` matrix."""
    return 0.5 * (M + M.mT)


def _solve_spd(M: Tensor, B: Tensor, name: str) -> Tensor:
    """Solve ``M X = B`` for symmetric positive-definite ``M`` ``(d, d)``, ``B`` ``(d, m)``.

    Cholesky (``M = L L^T``, ``X = cholesky_solve(B, L)``); if the factorisation fails (``M`` not
    numerically positive definite) falls back to an LU solve. Raises :class:`NumericalError` if
    ``M`` is singular or the solution is not finite. Returns ``X`` ``(d, m)``.
    """
    M = _symmetrise(M)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info.item()) == 0:
        X = torch.cholesky_solve(B, L)
    else:
        X = _solve_general(M, B, name)
    if not bool(torch.isfinite(X).all()):
        raise NumericalError(f"solving with {name} produced NaN/Inf (singular or ill-posed)")
    return X


def _solve_general(M: Tensor, B: Tensor, name: str) -> Tensor:
    """Solve ``M X = B`` for a general square ``M`` ``(d, d)``, ``B`` ``(d, m)`` (LU)."""
    try:
        X = torch.linalg.solve(M, B)
    except torch.linalg.LinAlgError as exc:  # singular matrix
        raise NumericalError(f"{name} is singular: {exc}") from exc
    if not bool(torch.isfinite(X).all()):
        raise NumericalError(f"solving with {name} produced NaN/Inf (singular or ill-posed)")
    return X


def _check_keys(K1: Tensor, d_in: int | None = None) -> None:
    _check_shape(K1, "K1", 2)
    if d_in is not None and K1.shape[0] != d_in:
        raise ValueError(f"K1 must have {d_in} rows (d_in), got shape {tuple(K1.shape)}")
    _check_finite(K1, "K1")


def _check_residual(R: Tensor, A: Tensor) -> None:
    _check_shape(R, "R", 2)
    if R.shape[1] != A.shape[0]:
        raise ValueError(
            f"R must be (d_out, n) with n = {A.shape[0]} edits, got shape {tuple(R.shape)}"
        )
    _check_finite(R, "R")


# --------------------------------------------------------------------------------------------
# null-space projector (AlphaEdit)
# --------------------------------------------------------------------------------------------


def nullspace_projector(C0: Tensor, threshold: float = 2e-2) -> Tensor:
    """Projector onto the approximate null space of the key statistics ``C0`` (AlphaEdit).

    AlphaEdit (Fang et al., ICLR 2025): with the eigendecomposition of the symmetrised
    ``C0 = U diag(e) U^T`` (``C0`` is ``(d_in, d_in)``), let ``U0`` ``(d_in, r)`` hold the
    eigenvectors whose eigenvalue is below ``threshold`` (absolute, as in AlphaEdit's
    ``nullspace_threshold``). Returns ``P = U0 U0^T`` ``(d_in, d_in)``: symmetric, idempotent,
    ``P k ~ 0`` for keys ``k`` in the high-energy (preserved-knowledge) directions of ``C0``.
    If no eigenvalue is below ``threshold`` the result is the zero matrix.

    Raises :class:`NumericalError` if ``C0`` has NaN/Inf entries or an eigenvalue below
    ``-1e-6 * max|e|`` (``C0`` is a second moment and must be positive semi-definite).
    """
    _check_square(C0, "C0")
    (C,) = _prepare(C0)
    _check_finite(C, "C0")
    evals, evecs = torch.linalg.eigh(_symmetrise(C))
    scale = evals.abs().max()
    if bool(evals.min() < -1e-6 * scale):
        raise NumericalError(
            f"C0 has a significantly negative eigenvalue {evals.min().item():.3e} "
            f"(max |eigenvalue| {scale.item():.3e}); it is not a second-moment matrix"
        )
    U0 = evecs[:, evals < threshold]
    return U0 @ U0.mT


# --------------------------------------------------------------------------------------------
# ROME
# --------------------------------------------------------------------------------------------


def rome_A(k: Tensor, C0: Tensor) -> Tensor:
    """ROME's A-matrix for one key: ``A = (C0^-1 k)^T / (k^T C0^-1 k)``.

    ROME (Meng et al., NeurIPS 2022), rank-one update. ``k`` ``(d_in,)`` (or ``(d_in, 1)``),
    ``C0`` ``(d_in, d_in)`` symmetric positive definite. Returns ``A`` ``(1, d_in)`` with
    ``A k = 1``: the update ``Delta = r A`` (``r = v - W k``, ``(d_out, 1)``) realises ``r``
    exactly at ``k``, and it is the solution of ``min tr(Delta C0 Delta^T) s.t. Delta k = r``.
    """
    if k.ndim == 2 and k.shape[1] == 1:
        k = k[:, 0]
    _check_shape(k, "k", 1)
    _check_square(C0, "C0", k.shape[0])
    kk, C = _prepare(k, C0)
    _check_finite(kk, "k")
    _check_finite(C, "C0")
    u = _solve_spd(C, kk[:, None], "C0")  # (d_in, 1) = C0^-1 k
    denom = (kk[None, :] @ u)[0, 0]  # k^T C0^-1 k
    if not bool(denom > 0):
        raise NumericalError(f"k^T C0^-1 k = {denom.item():.3e} is not positive")
    return u.mT / denom


def rome_A_general(k_u: Tensor, k_d: Tensor, C0: Tensor | None = None) -> Tensor:
    """ROME's A-matrix as the published code builds it: ``A = u^T / (u^T k_d)`` with
    ``u = C0^-1 k_u`` (``mom2_adjustment``) or ``u = k_u`` (``C0`` None).

    ``k_u`` ``(d_in,)``: the key that sets the update's direction (context-averaged in ROME's
    ``compute_u``); ``k_d`` ``(d_in,)``: the key at which the write is exact, ``A k_d = 1``
    (the plain rewrite prompt's key in ROME's ``compute_v``; ``k_d = k_u`` with ``C0`` gives
    :func:`rome_A`). Returns ``A`` ``(1, d_in)``; ``Delta = r A``.
    """
    k_u = k_u[:, 0] if k_u.ndim == 2 and k_u.shape[1] == 1 else k_u
    k_d = k_d[:, 0] if k_d.ndim == 2 and k_d.shape[1] == 1 else k_d
    _check_shape(k_u, "k_u", 1)
    _check_shape(k_d, "k_d", 1)
    if k_d.shape != k_u.shape:
        raise ValueError(f"k_u {tuple(k_u.shape)} and k_d {tuple(k_d.shape)} differ")
    if C0 is None:
        ku, kd = _prepare(k_u, k_d)
        u = ku[:, None]
    else:
        _check_square(C0, "C0", k_u.shape[0])
        ku, kd, C = _prepare(k_u, k_d, C0)
        _check_finite(C, "C0")
        u = _solve_spd(C, ku[:, None], "C0")  # (d_in, 1)
    _check_finite(ku, "k_u")
    _check_finite(kd, "k_d")
    denom = (kd[None, :] @ u)[0, 0]
    if not bool(denom.abs() > 0) or not bool(torch.isfinite(denom)):
        raise NumericalError(f"u^T k_d = {denom.item():.3e} is not usable")
    return u.mT / denom


def rome_update(W: Tensor, C0: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """ROME rank-one update: ``Delta = (v - W k) (C0^-1 k)^T / (k^T C0^-1 k)``.

    ``W`` ``(d_out, d_in)``, ``C0`` ``(d_in, d_in)``, ``k`` ``(d_in,)``, ``v`` ``(d_out,)``.
    Returns ``Delta`` ``(d_out, d_in)``; ``(W + Delta) k = v`` exactly (up to rounding).
    """
    _check_shape(W, "W", 2)
    _check_shape(v, "v", 1)
    if v.shape[0] != W.shape[0] or k.shape[0] != W.shape[1]:
        raise ValueError(
            f"shape mismatch: W {tuple(W.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    WW, CC, kk, vv = _prepare(W, C0, k, v)
    _check_finite(WW, "W")
    _check_finite(vv, "v")
    A = rome_A(kk, CC)  # (1, d_in)
    r = (vv - WW @ kk.reshape(-1))[:, None]  # (d_out, 1) = v - W k
    return r @ A


# --------------------------------------------------------------------------------------------
# MEMIT
# --------------------------------------------------------------------------------------------


def memit_A(K1: Tensor, C0: Tensor, lam: float) -> Tensor:
    """MEMIT's A-matrix: ``A = K1^T (lam C0 + K1 K1^T)^-1``.

    MEMIT (Meng et al., ICLR 2023). ``K1`` ``(d_in, n)``, ``C0`` ``(d_in, d_in)``, ``lam`` the
    covariance weight (``mom2_update_weight``, e.g. 15000). With ``M = lam C0 + K1 K1^T``
    (symmetric) ``A^T = M^-1 K1`` is one Cholesky solve with ``n`` right-hand sides.
    Returns ``A`` ``(n, d_in)``.
    """
    _check_keys(K1)
    _check_square(C0, "C0", K1.shape[0])
    K, C = _prepare(K1, C0)
    _check_finite(C, "C0")
    M = lam * C + K @ K.mT
    return _solve_spd(M, K, "lam*C0 + K1 K1^T").mT


def memit_update(R: Tensor, K1: Tensor, C0: Tensor, lam: float) -> Tensor:
    """MEMIT update ``Delta = R K1^T (lam C0 + K1 K1^T)^-1``.

    The minimiser of ``|(W + Delta) K1 - V|_F^2 + lam tr(Delta C0 Delta^T)`` with
    ``R = V - W K1``. ``R`` ``(d_out, n)``, ``K1`` ``(d_in, n)``, ``C0`` ``(d_in, d_in)``.
    Returns ``Delta`` ``(d_out, d_in)``. (For several layers, pass the layer's share of the
    residual, see :func:`spread_residual`.)
    """
    A = memit_A(K1, C0, lam)
    _check_residual(R, A)
    return R.to(A.dtype) @ A


def spread_residual(R: Tensor, layer_index: int, n_layers: int) -> Tensor:
    """The share of the residual MEMIT assigns to one of the ``L`` edited layers.

    MEMIT edits layers ``l_0 < ... < l_{L-1}`` in order. Before writing layer ``i`` (0-based)
    it recomputes the *remaining* residual ``R_i = V - Z_i`` (targets minus the current hidden
    states at the last edited layer, after the writes at layers ``0..i-1``), and solves layer
    ``i`` for ``R_i / (L - i)``: the first layer takes ``1/L`` of the residual, the last takes
    all that remains. This function returns ``R / (n_layers - layer_index)``; pass it the
    remaining residual ``R_i`` ``(d_out, n)``. Same shape and dtype as ``R``.
    """
    if not 0 <= layer_index < n_layers:
        raise ValueError(f"need 0 <= layer_index < n_layers, got {layer_index}, {n_layers}")
    return R / (n_layers - layer_index)


# --------------------------------------------------------------------------------------------
# AlphaEdit
# --------------------------------------------------------------------------------------------


def _resolve_prev_cov(Kp: Tensor | None, prev_cov: Tensor | None, d_in: int) -> Tensor | None:
    if Kp is not None and prev_cov is not None:
        raise ValueError("pass either Kp (d_in, m) or prev_cov = Kp Kp^T (d_in, d_in), not both")
    if Kp is not None:
        _check_shape(Kp, "Kp", 2)
        if Kp.shape[0] != d_in:
            raise ValueError(f"Kp must have {d_in} rows (d_in), got shape {tuple(Kp.shape)}")
        _check_finite(Kp, "Kp")
        Kp = Kp.to(compute_dtype(Kp))
        return Kp @ Kp.mT
    if prev_cov is not None:
        _check_square(prev_cov, "prev_cov", d_in)
        _check_finite(prev_cov, "prev_cov")
    return prev_cov


def alphaedit_A(
    K1: Tensor,
    P: Tensor,
    prev_cov: Tensor | None = None,
    lam: float = 10.0,
    *,
    Kp: Tensor | None = None,
) -> Tensor:
    """AlphaEdit's A-matrix: ``A = K1^T P (Kp Kp^T P + K1 K1^T P + lam I)^-1``.

    AlphaEdit (Fang et al., ICLR 2025). ``K1`` ``(d_in, n)``, ``P`` ``(d_in, d_in)`` the
    null-space projector (:func:`nullspace_projector`), ``prev_cov = Kp Kp^T`` ``(d_in, d_in)``
    the accumulated keys of earlier (sequential) edits or ``None`` (= 0); alternatively the raw
    previous keys ``Kp`` ``(d_in, m)``. ``lam`` is AlphaEdit's ``L2`` (e.g. 10).

    ``M = (prev_cov + K1 K1^T) P + lam I`` is not symmetric, so ``A`` is obtained from the
    transposed system ``M^T A^T = P^T K1`` (an LU solve). Returns ``A`` ``(n, d_in)``;
    ``A = A P``, so every update ``R A`` vanishes on ``range(I - P)``.
    """
    _check_keys(K1)
    d_in = K1.shape[0]
    _check_square(P, "P", d_in)
    cov = _resolve_prev_cov(Kp, prev_cov, d_in)
    K, PP = _prepare(K1, P) if cov is None else _prepare(K1, P, cov)[:2]
    _check_finite(PP, "P")
    C = K @ K.mT if cov is None else cov.to(K.dtype) + K @ K.mT
    eye = torch.eye(d_in, dtype=K.dtype, device=K.device)
    M = C @ PP + lam * eye
    return _solve_general(M.mT, PP.mT @ K, "(Kp Kp^T + K1 K1^T) P + lam I").mT


def alphaedit_update(
    R: Tensor,
    K1: Tensor,
    P: Tensor,
    Kp: Tensor | None = None,
    lam: float = 10.0,
    *,
    prev_cov: Tensor | None = None,
) -> Tensor:
    """AlphaEdit update ``Delta = R K1^T P (Kp Kp^T P + K1 K1^T P + lam I)^-1``.

    The minimiser over ``Delta = D' P`` of
    ``|(W + Delta) K1 - V|_F^2 + |Delta Kp|_F^2 + lam |Delta|_F^2`` with ``R = V - W K1``.
    ``R`` ``(d_out, n)``, ``K1`` ``(d_in, n)``, ``P`` ``(d_in, d_in)``, previous keys either as
    ``Kp`` ``(d_in, m)`` or accumulated as ``prev_cov = Kp Kp^T`` ``(d_in, d_in)``.
    Returns ``Delta`` ``(d_out, d_in)`` with ``Delta (I - P) = 0``.
    """
    A = alphaedit_A(K1, P, prev_cov, lam, Kp=Kp)
    _check_residual(R, A)
    return R.to(A.dtype) @ A


# --------------------------------------------------------------------------------------------
# EMMET
# --------------------------------------------------------------------------------------------


def emmet_A(K1: Tensor, C0: Tensor, ridge: float = 0.0) -> Tensor:
    """EMMET's A-matrix: ``A = (K1^T C0^-1 K1)^-1 K1^T C0^-1``.

    EMMET (Gupta et al., 2024): batched ROME, i.e. ``min tr(Delta C0 Delta^T)`` subject to the
    equality constraints ``Delta K1 = R``. ``K1`` ``(d_in, n)``, ``C0`` ``(d_in, d_in)`` symmetric
    positive definite; ``G = K1^T C0^-1 K1`` ``(n, n)`` must be invertible (linearly independent
    keys). ``ridge`` adds ``ridge * I`` to ``G`` (0 gives the paper's formula; > 0 trades exact
    realisation for stability with near-duplicate keys). Returns ``A`` ``(n, d_in)``; with
    ``ridge = 0``, ``A K1 = I`` (every edit realised exactly).
    """
    _check_keys(K1)
    _check_square(C0, "C0", K1.shape[0])
    K, C = _prepare(K1, C0)
    _check_finite(C, "C0")
    X = _solve_spd(C, K, "C0")  # (d_in, n) = C0^-1 K1
    G = K.mT @ X  # (n, n)
    if ridge:
        G = G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    # G is symmetric positive definite when the keys are independent; Cholesky first, LU after.
    return _solve_spd(G, X.mT, "K1^T C0^-1 K1")


def emmet_update(R: Tensor, K1: Tensor, C0: Tensor, ridge: float = 0.0) -> Tensor:
    """EMMET update ``Delta = (V - W K1) (K1^T C0^-1 K1)^-1 K1^T C0^-1 = R A``.

    ``R`` ``(d_out, n)``, ``K1`` ``(d_in, n)``, ``C0`` ``(d_in, d_in)``. Returns ``Delta``
    ``(d_out, d_in)`` with ``Delta K1 = R`` (for ``ridge = 0``). See :func:`emmet_A`.
    """
    A = emmet_A(K1, C0, ridge)
    _check_residual(R, A)
    return R.to(A.dtype) @ A


# --------------------------------------------------------------------------------------------
# NSE (neuron-level sequential editing)
# --------------------------------------------------------------------------------------------


def select_neurons(K1: Tensor, threshold: float) -> Tensor:
    """NSE's neuron selection (Jiang et al. 2024, released ``nse_main``): the input neurons
    (rows of the keys) that carry the edit keys' activation mass.

    ``K1`` ``(d_in, n)``: with scores ``s = sum_j |K1[:, j]|`` ``(d_in,)`` (summed over the
    requests in order) sorted descending,
    keep the longest prefix of the sorted indices whose cumulative score is at most
    ``threshold * sum(s)``. Computed in ``K1``'s dtype with the release's operations (sort,
    cumsum, sum), so that at ``threshold = 1`` the rounding of the last few cumulative sums
    decides exactly as there. Returns the indices ``(m,)`` (long, in sorted order). Raises
    :class:`NumericalError` if no neuron qualifies (the first score alone exceeds the share).
    """
    _check_shape(K1, "K1", 2)
    _check_finite(K1, "K1")
    scores = torch.zeros_like(K1[:, 0])
    for j in range(K1.shape[1]):  # the release's loop: the same float sums in the same order
        scores = scores + K1[:, j].abs()
    sorted_scores, order = torch.sort(scores, descending=True)
    within = torch.nonzero(torch.cumsum(sorted_scores, 0) <= threshold * scores.sum())[:, 0]
    if len(within) == 0:
        raise NumericalError(f"no neuron within {threshold} of the key mass")
    return order[: int(within[-1]) + 1]


def subspace_memit_A(K1: Tensor, C: Tensor, neurons: Tensor) -> Tensor:
    """MEMIT's solve restricted to the input neurons ``S = neurons`` (NSE's update):
    ``A[:, S] = K_S^T (C_SS + K_S K_S^T)^-1`` and ``A[:, j] = 0`` for ``j`` not in ``S``.

    ``K1`` ``(d_in, n)``, ``C`` ``(d_in, d_in)`` the preservation matrix (NSE:
    ``lambda C0 + K_p K_p^T``), ``neurons`` ``(m,)`` indices. Returns ``A`` ``(n, d_in)``; the
    update ``Delta = R A`` changes only the columns ``S`` of W (the weights read from the
    selected neurons).
    """
    _check_keys(K1)
    _check_square(C, "C", K1.shape[0])
    K, CC = _prepare(K1, C)
    _check_finite(CC, "C")
    idx = neurons.to(device=K.device, dtype=torch.long)
    A = torch.zeros(K.shape[1], K.shape[0], dtype=K.dtype, device=K.device)
    A[:, idx] = memit_A(K[idx], CC[idx][:, idx], 1.0)
    return A


# --------------------------------------------------------------------------------------------
# UltraEdit (lifelong normalisation, closed-form shift)
# --------------------------------------------------------------------------------------------


def lifelong_stats_update(n: Tensor, mean: Tensor, var: Tensor, X: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """UltraEdit's running feature statistics (``RunningMeanStd.update`` of the release) after
    the rows of ``X`` ``(m, d)``: with ``mu_X`` and ``s2_X`` the mean and the unbiased variance
    of the rows,

        n' = n + m,  delta = mu_X - mean,  mean' = mean + m delta / n',
        var' = var + m s2_X + n m delta^2 / n'

    (``var`` accumulates ``m s2_X``, not the ``(m - 1) s2_X`` of an exact pooled sum of
    squares, as the release does). ``n`` ``(1,)``, ``mean``/``var`` ``(d,)``. A single row
    (``m = 1``) has no unbiased variance (the release gets NaN); it contributes 0 here.
    Returns ``(n', mean', var')`` in ``X``'s dtype.
    """
    _check_shape(X, "X", 2)
    _check_finite(X, "X")
    m = X.shape[0]
    n = n.to(X.dtype)
    new_n = n + m
    delta = X.mean(0) - mean.to(X.dtype)
    s2 = X.var(0) if m > 1 else torch.zeros_like(delta)
    new_mean = mean.to(X.dtype) + m * delta / new_n
    new_var = var.to(X.dtype) + m * s2 + n * m * delta.pow(2) / new_n
    return new_n, new_mean, new_var


def lifelong_normalize(X: Tensor, n: Tensor, mean: Tensor, var: Tensor,
                       eps: float | None = None) -> Tensor:
    """UltraEdit's lifelong normalisation of the rows of ``X`` ``(m, d)``:
    ``(X - mean) / (std + eps)`` with ``std = sqrt(var / (n - 1 + eps))`` (the statistics of
    :func:`lifelong_stats_update`; ``eps`` the float32 machine epsilon, as the release)."""
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    std = (var.to(X.dtype) / (n.to(X.dtype) - 1 + eps)).sqrt()
    return (X - mean.to(X.dtype)) / (std + eps)


def ultraedit_values(K_hat: Tensor, G_hat: Tensor, lr: float) -> Tensor:
    """UltraEdit's value features: ``V[:, t] = -lr |k_hat_t|^2 g_hat_t`` for the normalised key
    and gradient of every token ``t``: ``K_hat`` ``(d_in, N)``, ``G_hat`` ``(d_out, N)``.
    Returns ``V`` ``(d_out, N)``."""
    return -lr * (K_hat * K_hat).sum(0, keepdim=True) * G_hat


def ultraedit_A(K: Tensor, ridge: float = 1.0) -> Tensor:
    """UltraEdit's closed form as an A-matrix: ``A = (K^T K + ridge I)^-1 K^T`` ``(N, d_in)``
    for the raw keys ``K`` ``(d_in, N)`` of the batch's N answer tokens, so that
    ``Delta = V A = V K^T (K K^T + ridge I)^-1`` (push-through identity; the release solves the
    ``(d_in, d_in)`` form ``(K K^T + I) Delta^T = K V^T``): the minimiser of
    ``|Delta K - V|_F^2 + ridge |Delta|_F^2``. ``ridge`` is 1 in the release.
    """
    _check_keys(K)
    (KK,) = _prepare(K)
    G = KK.mT @ KK  # (N, N)
    G = G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return _solve_spd(G, KK.mT, "K^T K + ridge I")
