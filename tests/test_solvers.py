"""Closed-form solvers against independent least-squares solves (float64, seeded)."""

from __future__ import annotations

import pytest
import torch

from methods.solvers import (
    NumericalError,
    alphaedit_A,
    alphaedit_update,
    compute_dtype,
    emmet_A,
    emmet_update,
    memit_A,
    memit_update,
    nullspace_projector,
    rome_A,
    rome_update,
    spread_residual,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _spd(g: torch.Generator, d: int, n_samples: int = 200) -> torch.Tensor:
    """A well-conditioned random second moment ``E[k k^T]`` (d, d)."""
    X = _randn(g, d, n_samples)
    return X @ X.T / n_samples + 0.1 * torch.eye(d, dtype=F64)


def _orthonormal(g: torch.Generator, d: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(_randn(g, d, d))
    return Q


def _structured_stats(
    g: torch.Generator, d_in: int, n_high: int, low: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C0 = Q diag(e) Q^T`` with ``n_high`` high-energy directions (eigenvalues in [1, 5]) and
    ``d_in - n_high`` low-energy ones (eigenvalue ``low``, below AlphaEdit's threshold).

    Returns ``(C0, Q_high (d_in, n_high), Q_low (d_in, d_in - n_high))``.
    """
    Q = _orthonormal(g, d_in)
    e = torch.cat(
        [
            1.0 + 4.0 * torch.rand(n_high, generator=g, dtype=F64),
            torch.full((d_in - n_high,), low, dtype=F64),
        ]
    )
    C0 = Q @ torch.diag(e) @ Q.T
    return C0, Q[:, :n_high], Q[:, n_high:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _sqrtm_psd(C: torch.Tensor) -> torch.Tensor:
    e, U = torch.linalg.eigh(C)
    return U @ torch.diag(e.clamp_min(0).sqrt()) @ U.T


# ------------------------------------------------------------------------------------------
# MEMIT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 15000.0])
def test_memit_equals_stacked_least_squares(lam: float) -> None:
    """argmin_D |(W + D) K1 - V|^2 + lam tr(D C0 D^T) as the stacked least-squares problem
    D [K1, sqrt(lam) C0^{1/2}] ~ [R, 0] (solved by QR-based lstsq)."""
    g = _gen(0)
    d_in, d_out, n = 12, 7, 5
    W, K1, V = _randn(g, d_out, d_in), _randn(g, d_in, n), _randn(g, d_out, n)
    C0 = _spd(g, d_in)
    R = V - W @ K1

    lhs = torch.cat([K1.T, lam**0.5 * _sqrtm_psd(C0)], dim=0)  # (n + d_in, d_in)
    rhs = torch.cat([R.T, torch.zeros(d_in, d_out, dtype=F64)], dim=0)  # (n + d_in, d_out)
    D_ref = torch.linalg.lstsq(lhs, rhs).solution.T

    D = memit_update(R, K1, C0, lam)
    assert D.shape == (d_out, d_in)
    assert _rel(D, D_ref) < 1e-9
    assert torch.allclose(D, R @ memit_A(K1, C0, lam), rtol=0, atol=1e-14 * D.abs().max())


def test_memit_gradient_vanishes_at_solution() -> None:
    """Normal equation: (D K1 - R) K1^T + lam D C0 = 0."""
    g = _gen(1)
    d_in, d_out, n, lam = 9, 4, 3, 2.0
    R, K1, C0 = _randn(g, d_out, n), _randn(g, d_in, n), _spd(g, d_in)
    D = memit_update(R, K1, C0, lam)
    grad = (D @ K1 - R) @ K1.T + lam * D @ C0
    assert float(grad.abs().max()) < 1e-12 * float(R.abs().max() * K1.abs().max())


# ------------------------------------------------------------------------------------------
# null-space projector
# ------------------------------------------------------------------------------------------


def test_nullspace_projector_is_the_low_energy_projector() -> None:
    g = _gen(2)
    C0, Q_high, Q_low = _structured_stats(g, d_in=10, n_high=4)
    # a slightly asymmetric copy must be symmetrised
    C0_asym = C0 + 1e-12 * _randn(g, 10, 10)
    P = nullspace_projector(C0_asym, threshold=2e-2)
    assert P.shape == (10, 10)
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-12)
    assert torch.allclose(P, Q_low @ Q_low.T, atol=1e-10)
    assert float(torch.linalg.norm(P @ Q_high)) < 1e-10
    assert round(float(torch.trace(P))) == 6


def test_nullspace_projector_threshold_extremes() -> None:
    g = _gen(3)
    C0 = _spd(g, 6)  # all eigenvalues >= 0.1
    assert torch.count_nonzero(nullspace_projector(C0, threshold=1e-3)) == 0
    assert torch.allclose(nullspace_projector(C0, threshold=1e9), torch.eye(6, dtype=F64))


def test_nullspace_projector_rejects_bad_statistics() -> None:
    g = _gen(4)
    C0 = _spd(g, 5)
    bad = C0.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        nullspace_projector(bad)
    with pytest.raises(ValueError):  # NumericalError is a ValueError
        nullspace_projector(torch.full((5, 5), float("inf"), dtype=F64))
    Q = _orthonormal(g, 5)
    indefinite = Q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.1, -0.2], dtype=F64)) @ Q.T
    with pytest.raises(NumericalError, match="negative eigenvalue"):
        nullspace_projector(indefinite)
    # rounding-level negative eigenvalues are accepted
    tiny = Q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.0, -1e-12], dtype=F64)) @ Q.T
    assert nullspace_projector(tiny).shape == (5, 5)
    with pytest.raises(ValueError, match="square"):
        nullspace_projector(torch.zeros(3, 4, dtype=F64))


# ------------------------------------------------------------------------------------------
# AlphaEdit
# ------------------------------------------------------------------------------------------


def _alphaedit_lstsq(
    R: torch.Tensor, K1: torch.Tensor, Kp: torch.Tensor, U0: torch.Tensor, lam: float
) -> torch.Tensor:
    """argmin over D = D' P (P = U0 U0^T) of |D K1 - R|^2 + |D Kp|^2 + lam |D|^2.

    Parametrise D = B U0^T (B: d_out x r); then |D|_F = |B|_F and each row b of B solves the
    stacked least-squares problem [K1^T U0; Kp^T U0; sqrt(lam) I_r] b ~ [r_row; 0; 0].
    """
    r = U0.shape[1]
    d_out = R.shape[0]
    lhs = torch.cat([K1.T @ U0, Kp.T @ U0, lam**0.5 * torch.eye(r, dtype=F64)], dim=0)
    zeros = torch.zeros(Kp.shape[1] + r, d_out, dtype=F64)
    rhs = torch.cat([R.T, zeros], dim=0)
    B = torch.linalg.lstsq(lhs, rhs).solution.T  # (d_out, r)
    return B @ U0.T


@pytest.mark.parametrize("lam", [10.0, 0.3])
def test_alphaedit_equals_stacked_least_squares(lam: float) -> None:
    g = _gen(5)
    d_in, d_out, n, m = 14, 6, 4, 5
    C0, _, Q_low = _structured_stats(g, d_in, n_high=5)
    P = nullspace_projector(C0)
    W, K1, V, Kp = (
        _randn(g, d_out, d_in),
        _randn(g, d_in, n),
        _randn(g, d_out, n),
        _randn(g, d_in, m),
    )
    R = V - W @ K1

    D_ref = _alphaedit_lstsq(R, K1, Kp, Q_low, lam)
    D_kp = alphaedit_update(R, K1, P, Kp, lam)
    D_cov = alphaedit_update(R, K1, P, lam=lam, prev_cov=Kp @ Kp.T)
    assert D_kp.shape == (d_out, d_in)
    assert _rel(D_kp, D_ref) < 1e-9
    assert _rel(D_cov, D_ref) < 1e-9
    assert _rel(R @ alphaedit_A(K1, P, Kp @ Kp.T, lam), D_ref) < 1e-9

    # without previous keys
    D0_ref = _alphaedit_lstsq(R, K1, torch.zeros(d_in, 0, dtype=F64), Q_low, lam)
    assert _rel(alphaedit_update(R, K1, P, lam=lam), D0_ref) < 1e-9


def test_alphaedit_leaves_preserved_keys_unchanged() -> None:
    g = _gen(6)
    d_in, d_out, n = 16, 8, 5
    C0, Q_high, _ = _structured_stats(g, d_in, n_high=6)
    P = nullspace_projector(C0)
    W, V = _randn(g, d_out, d_in), _randn(g, d_out, n)
    K0 = Q_high @ _randn(g, 6, 40)  # preserved keys: the high-energy directions of C0
    K1 = _randn(g, d_in, n)
    Kp = _randn(g, d_in, 3)
    for prev in (None, Kp @ Kp.T):
        D = alphaedit_update(V - W @ K1, K1, P, prev_cov=prev)
        assert float(torch.linalg.norm(D)) > 1e-3  # a real update happened
        assert float(torch.linalg.norm(D @ K0) / torch.linalg.norm(W @ K0)) < 1e-6
        assert float(torch.linalg.norm(D - D @ P)) < 1e-12 * float(torch.linalg.norm(D))


def test_alphaedit_argument_checks() -> None:
    g = _gen(7)
    K1, P, Kp = _randn(g, 6, 2), torch.eye(6, dtype=F64), _randn(g, 6, 3)
    with pytest.raises(ValueError, match="not both"):
        alphaedit_A(K1, P, Kp @ Kp.T, Kp=Kp)
    with pytest.raises(ValueError, match="prev_cov"):
        alphaedit_A(K1, P, torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match="R must be"):
        alphaedit_update(_randn(g, 4, 3), K1, P)
    # a singular system is reported, not silently returned
    with pytest.raises(NumericalError, match="singular"):
        alphaedit_A(K1, torch.zeros(6, 6, dtype=F64), lam=0.0)


# ------------------------------------------------------------------------------------------
# ROME and EMMET
# ------------------------------------------------------------------------------------------


def test_rome_realises_target_exactly() -> None:
    g = _gen(8)
    d_in, d_out = 11, 7
    W, k, v, C0 = _randn(g, d_out, d_in), _randn(g, d_in), _randn(g, d_out), _spd(g, d_in)
    D = rome_update(W, C0, k, v)
    assert D.shape == (d_out, d_in)
    assert torch.linalg.matrix_rank(D) == 1
    assert float(torch.linalg.norm((W + D) @ k - v) / torch.linalg.norm(v)) < 1e-10
    A = rome_A(k, C0)
    assert A.shape == (1, d_in)
    assert abs(float(A @ k) - 1.0) < 1e-12


def test_rome_is_minimum_c0_norm_solution() -> None:
    """min tr(D C0 D^T) s.t. D k = r: with C0 = L L^T and E = D L it is the minimum-Frobenius
    norm solution of E (L^-1 k) = r, computed here by an SVD-based lstsq (gelsd)."""
    g = _gen(9)
    d_in, d_out = 8, 5
    W, k, v, C0 = _randn(g, d_out, d_in), _randn(g, d_in), _randn(g, d_out), _spd(g, d_in)
    r = v - W @ k
    L = torch.linalg.cholesky(C0)
    w = torch.linalg.solve_triangular(L, k[:, None], upper=False)  # (d_in, 1) = L^-1 k
    E = torch.linalg.lstsq(w.T, r[None, :], driver="gelsd").solution.T  # (d_out, d_in)
    D_ref = torch.linalg.solve_triangular(L.T, E.T, upper=True).T  # E L^-1
    assert _rel(rome_update(W, C0, k, v), D_ref) < 1e-9


def test_emmet_realises_all_edits_and_reduces_to_rome() -> None:
    g = _gen(10)
    d_in, d_out, n = 12, 6, 4
    W, K1, V, C0 = _randn(g, d_out, d_in), _randn(g, d_in, n), _randn(g, d_out, n), _spd(g, d_in)
    R = V - W @ K1
    D = emmet_update(R, K1, C0)
    assert D.shape == (d_out, d_in)
    assert _rel((W + D) @ K1, V) < 1e-10
    assert _rel(emmet_A(K1, C0) @ K1, torch.eye(n, dtype=F64)) < 1e-12
    k, v = K1[:, 0], V[:, 0]
    assert _rel(emmet_update(R[:, :1], K1[:, :1], C0), rome_update(W, C0, k, v)) < 1e-12
    # ridge > 0 shrinks, so the realisation is no longer exact
    assert _rel((W + emmet_update(R, K1, C0, ridge=1.0)) @ K1, V) > 1e-3

    # it is the constrained minimiser: any other D' with D' K1 = R has larger tr(D' C0 D'^T)
    N = torch.linalg.svd(K1.T).Vh[n:].T  # (d_in, d_in - n), K1^T N = 0
    other = D + _randn(g, d_out, d_in - n) @ N.T
    assert _rel(other @ K1, D @ K1) < 1e-12
    assert torch.trace(other @ C0 @ other.T) > torch.trace(D @ C0 @ D.T)


# ------------------------------------------------------------------------------------------
# spreading, dtypes, errors
# ------------------------------------------------------------------------------------------


def test_spread_residual_schedule() -> None:
    g = _gen(11)
    R = _randn(g, 5, 3)
    L = 4
    remaining = R.clone()
    shares = []
    for i in range(L):
        share = spread_residual(remaining, i, L)
        shares.append(share)
        remaining = remaining - share  # each layer realises its share exactly
    assert torch.allclose(shares[0], R / L)
    assert torch.allclose(shares[-1], R / L)  # equal shares when each layer is exact
    assert float(remaining.abs().max()) < 1e-14
    assert torch.equal(spread_residual(R, L - 1, L), R)
    for bad in (-1, L):
        with pytest.raises(ValueError):
            spread_residual(R, bad, L)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float32, torch.float32), (torch.float64, F64), (torch.bfloat16, torch.float32)],
)
def test_dtypes(dtype: torch.dtype, expected: torch.dtype) -> None:
    g = _gen(12)
    d_in, d_out, n = 10, 6, 3
    C0, _, _ = _structured_stats(g, d_in, n_high=4, low=1e-3)
    C0 = C0 + 1e-2 * torch.eye(d_in, dtype=F64)
    W, K1, V = _randn(g, d_out, d_in), _randn(g, d_in, n), _randn(g, d_out, n)
    C0, W, K1, V = (t.to(dtype) for t in (C0, W, K1, V))
    R = V - W @ K1
    assert compute_dtype(R, K1) == expected
    P = nullspace_projector(C0)
    outs = [
        P,
        memit_update(R, K1, C0, 2.0),
        alphaedit_update(R, K1, P, K1[:, :2]),
        alphaedit_update(R, K1, P, prev_cov=torch.eye(d_in, dtype=dtype)),
        rome_update(W, C0, K1[:, 0], V[:, 0]),
        emmet_update(R, K1, C0),
    ]
    for out in outs:
        assert out.dtype == expected
        assert bool(torch.isfinite(out).all())
    # float32 results agree with float64 ones to float32 accuracy
    if dtype == torch.float32:
        ref = memit_update(R.double(), K1.double(), C0.double(), 2.0)
        assert _rel(outs[1].double(), ref) < 1e-4


def test_nan_statistics_raise_numerical_error() -> None:
    g = _gen(13)
    d_in, d_out, n = 6, 4, 2
    C0 = _spd(g, d_in)
    C0[0, 0] = float("nan")
    W, K1, V = _randn(g, d_out, d_in), _randn(g, d_in, n), _randn(g, d_out, n)
    R = V - W @ K1
    with pytest.raises(NumericalError):
        memit_update(R, K1, C0, 1.0)
    with pytest.raises(NumericalError):
        rome_update(W, C0, K1[:, 0], V[:, 0])
    with pytest.raises(NumericalError):
        emmet_update(R, K1, C0)
    with pytest.raises(NumericalError):
        nullspace_projector(C0)
    R_bad = R.clone()
    R_bad[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="R contains"):
        memit_update(R_bad, K1, _spd(g, d_in), 1.0)


def test_shape_errors() -> None:
    g = _gen(14)
    C0 = _spd(g, 6)
    with pytest.raises(ValueError, match="K1 must be 2-D"):
        memit_A(_randn(g, 6), C0, 1.0)
    with pytest.raises(ValueError, match="C0 must be"):
        memit_A(_randn(g, 5, 2), C0, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        rome_update(_randn(g, 3, 6), C0, _randn(g, 6), _randn(g, 4))
