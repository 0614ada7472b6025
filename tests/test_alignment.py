"""MetaKE diagnostics and proxy maths (float64 random matrices, seeded)."""

from __future__ import annotations

import pytest
import torch

from methods.alignment import (
    alignment,
    kernel_energy,
    key_feasibility,
    proxy_hypergradient,
    realisation,
    realisation_operator,
    virtual_lookahead,
    z_error,
)
from methods.solvers import alphaedit_A, emmet_A, memit_A, nullspace_projector, rome_A

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _problem(
    seed: int, d_in: int = 10, d_out: int = 6, n: int = 4, n_high: int = 4
) -> dict[str, torch.Tensor]:
    """Statistics with ``n_high`` high-energy directions, AlphaEdit projector ``P`` onto the
    rest, and edit keys ``K1`` whose last column lies fully in range(I - P), so that
    ``P K1`` (and hence ``S``) has a one-dimensional kernel."""
    g = _gen(seed)
    Q, _ = torch.linalg.qr(_randn(g, d_in, d_in))
    e = torch.cat(
        [
            1.0 + 4.0 * torch.rand(n_high, generator=g, dtype=F64),
            torch.full((d_in - n_high,), 1e-4, dtype=F64),
        ]
    )
    C0 = Q @ torch.diag(e) @ Q.T
    P = nullspace_projector(C0)
    K1 = _randn(g, d_in, n)
    K1[:, -1] = Q[:, :n_high] @ _randn(g, n_high)  # infeasible key: P k = 0
    return {
        "C0": C0,
        "P": P,
        "K1": K1,
        "W": _randn(g, d_out, d_in),
        "T": _randn(g, d_out, n),  # open-loop residual V_target - W K1
        "Kp": _randn(g, d_in, 3),
        "Q_high": Q[:, :n_high],
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ------------------------------------------------------------------------------------------
# realisation operator and per-edit diagnostics
# ------------------------------------------------------------------------------------------


def test_realisation_operator_forms() -> None:
    p = _problem(0)
    K1, P, C0 = p["K1"], p["P"], p["C0"]
    lam = 2.0
    n = K1.shape[1]
    S = realisation_operator(alphaedit_A(K1, P, lam=lam), K1)
    G = K1.T @ P @ K1
    S_ref = torch.linalg.solve(lam * torch.eye(n, dtype=F64) + G, G)  # (lam + G)^-1 G
    assert S.shape == (n, n)
    assert _rel(S, S_ref) < 1e-10
    assert _rel(S, S.T) < 1e-10  # symmetric with no previous keys
    gains = torch.linalg.eigvalsh(0.5 * (S + S.T))
    assert float(gains.max()) < 1.0
    assert abs(float(gains.min())) < 1e-10  # the infeasible key
    # single edit: scalar shrink rho = |Pk|^2 / (lam + |Pk|^2)
    k = K1[:, :1]
    s1 = realisation_operator(alphaedit_A(k, P, lam=lam), k)
    pk2 = float((P @ k).pow(2).sum())
    assert abs(float(s1) - pk2 / (lam + pk2)) < 1e-12
    # exact solvers: S = I
    assert _rel(realisation_operator(rome_A(k[:, 0], C0), k), torch.ones(1, 1, dtype=F64)) < 1e-12
    eye = torch.eye(n, dtype=F64)
    assert _rel(realisation_operator(emmet_A(K1, C0), K1), eye) < 1e-10
    # still symmetric with previous keys: P (C P + lam I)^-1 = (P C + lam I)^-1 P
    S_p = realisation_operator(alphaedit_A(K1, P, p["Kp"] @ p["Kp"].T, lam=lam), K1)
    assert _rel(S_p, S_p.T) < 1e-10
    assert float(torch.linalg.eigvalsh(S_p).max()) < float(gains.max())  # old keys cost gain
    # MEMIT shrinks too
    S_m = realisation_operator(memit_A(K1, C0, 1.0), K1)
    assert float(torch.linalg.eigvalsh(0.5 * (S_m + S_m.T)).max()) < 1.0
    with pytest.raises(ValueError):
        realisation_operator(alphaedit_A(K1, P), K1[:, :2])


def test_key_feasibility() -> None:
    p = _problem(1)
    P, K1, Q_high = p["P"], p["K1"], p["Q_high"]
    phi = key_feasibility(P, K1)
    assert phi.shape == (K1.shape[1],)
    assert float(phi[-1]) < 1e-12  # fully in range(I - P)
    assert bool(((phi >= 0) & (phi <= 1 + 1e-12)).all())
    ref = torch.einsum("in,ij,jn->n", K1, P, K1) / (K1 * K1).sum(0)
    assert torch.allclose(phi, ref, atol=1e-12)
    k_free = P @ K1[:, 0]
    assert abs(float(key_feasibility(P, k_free)) - 1.0) < 1e-12
    assert float(key_feasibility(P, Q_high[:, 0])) < 1e-12


def test_realisation_and_z_error() -> None:
    g = _gen(2)
    d, n = 7, 5
    z0, v = _randn(g, d, n), _randn(g, d, n)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5], dtype=F64)
    z_post = z0 + t * (v - z0)  # moves a fraction t of the way
    rho, e = realisation(z_post, z0, v), z_error(z_post, z0, v)
    assert rho.shape == (n,) and e.shape == (n,)
    assert torch.allclose(rho, t, atol=1e-12)
    assert torch.allclose(e, (1 - t).abs(), atol=1e-12)
    # an orthogonal miss: rho unchanged, error grows
    want = v[:, 0] - z0[:, 0]
    ortho = _randn(g, d)
    ortho = ortho - (ortho @ want) / (want @ want) * want
    zp = z0[:, 0] + 0.5 * want + ortho
    assert abs(float(realisation(zp, z0[:, 0], v[:, 0])) - 0.5) < 1e-12
    expected = float(torch.linalg.norm(ortho - 0.5 * want) / torch.linalg.norm(want))
    assert abs(float(z_error(zp, z0[:, 0], v[:, 0])) - expected) < 1e-12


# ------------------------------------------------------------------------------------------
# alignment and kernel energy
# ------------------------------------------------------------------------------------------


def test_alignment_and_kernel_energy_on_known_subspaces() -> None:
    p = _problem(3)
    S = realisation_operator(alphaedit_A(p["K1"], p["P"], lam=1.0), p["K1"])
    gains, U = torch.linalg.eigh(S)
    g = _gen(4)
    high = U[:, gains >= 0.5]
    low = U[:, gains < 0.5]
    kern = U[:, gains.abs() <= 1e-6 * gains.abs().max()]
    assert high.shape[1] >= 1 and low.shape[1] >= 1 and kern.shape[1] == 1

    R_high = _randn(g, 6, high.shape[1]) @ high.T
    R_low = _randn(g, 6, low.shape[1]) @ low.T
    R_kern = _randn(g, 6, 1) @ kern.T
    assert abs(float(alignment(R_high, S)) - 1.0) < 1e-12
    assert float(alignment(R_low, S)) < 1e-12
    assert abs(float(kernel_energy(R_kern, S)) - 1.0) < 1e-12
    assert float(kernel_energy(R_high, S)) < 1e-12
    # mixed residual: energies add in quadrature
    a_mix = float(alignment(R_high + R_low, S))
    ref = float(torch.linalg.norm(R_high) / torch.linalg.norm(R_high + R_low))
    assert abs(a_mix - ref) < 1e-12
    # no kernel -> 0; zero residual -> NaN
    full = torch.diag(torch.tensor([0.9, 0.5, 0.2], dtype=F64))
    assert float(kernel_energy(_randn(g, 4, 3), full)) == 0.0
    assert bool(torch.isnan(alignment(torch.zeros(4, 3, dtype=F64), full)))
    with pytest.raises(ValueError):
        alignment(_randn(g, 4, 2), full)


# ------------------------------------------------------------------------------------------
# the structural gradient proxy
# ------------------------------------------------------------------------------------------


def test_hypergradient_matches_finite_differences() -> None:
    p = _problem(5)
    W, K1, P, Kp = p["W"], p["K1"], p["P"], p["Kp"]
    g = _gen(6)
    A = alphaedit_A(K1, P, Kp @ Kp.T, lam=3.0)
    Z0 = W @ K1
    X = _randn(g, K1.shape[0], 9)  # probe inputs
    V0 = Z0 + _randn(g, *Z0.shape)
    V = V0 + 0.3 * _randn(g, *Z0.shape)
    gamma = 0.7

    def loss(Vx: torch.Tensor) -> torch.Tensor:
        delta = (Vx - Z0) @ A
        return torch.tanh(delta @ X).sum() + gamma * (Vx - V0).pow(2).sum()

    delta = (V - Z0) @ A
    grad_delta = (1 - torch.tanh(delta @ X).pow(2)) @ X.T  # d/dDelta sum tanh(Delta X)
    grad = proxy_hypergradient(grad_delta, A, V, V0, gamma)
    assert grad.shape == V.shape

    h = 1e-5
    fd = torch.zeros_like(V)
    for i in range(V.shape[0]):
        for j in range(V.shape[1]):
            E = torch.zeros_like(V)
            E[i, j] = h
            fd[i, j] = (loss(V + E) - loss(V - E)) / (2 * h)
    assert _rel(grad, fd) < 1e-6

    # and autograd through the look-ahead hook gives the same gradient (gamma = 0 part)
    Vv = V.clone().requires_grad_(True)
    out = virtual_lookahead(torch.zeros(9, W.shape[0], dtype=F64), X.T, Vv, Z0, A)
    out.tanh().sum().backward()
    assert Vv.grad is not None
    ref = proxy_hypergradient(grad_delta, A, V, V0, 0.0)
    assert _rel(Vv.grad, ref) < 1e-12
    with pytest.raises(ValueError):
        proxy_hypergradient(grad_delta, A, V.T, V0, gamma)


def _upper_optimum(
    S: torch.Tensor, T: torch.Tensor, gamma: float, R_anchor: torch.Tensor
) -> torch.Tensor:
    """argmin_R 0.5 |R S - T|^2 + gamma |R - R_anchor|^2 in closed form:
    R (S S^T + 2 gamma I) = T S^T + 2 gamma R_anchor."""
    n = S.shape[0]
    M = S @ S.T + 2 * gamma * torch.eye(n, dtype=F64)
    return torch.linalg.solve(M, (T @ S.T + 2 * gamma * R_anchor).T).T


@pytest.mark.parametrize("with_prev_keys", [False, True])
def test_upper_optimum_spends_no_residual_in_kernel(with_prev_keys: bool) -> None:
    """min_V 0.5 |Delta(V) K1 - T|^2 + gamma |V - W K1|^2 with Delta(V) = (V - W K1) A: the
    optimal residual has no energy where the solver realises nothing; the open-loop residual
    T does. Solved in closed form and by L-BFGS driven by ``proxy_hypergradient``."""
    p = _problem(7)
    W, K1, P, T = p["W"], p["K1"], p["P"], p["T"]
    prev = p["Kp"] @ p["Kp"].T if with_prev_keys else None
    A = alphaedit_A(K1, P, prev, lam=1.0)
    S = realisation_operator(A, K1)
    Z0 = W @ K1
    gamma = 1e-3

    R_star = _upper_optimum(S, T, gamma, torch.zeros_like(T))
    assert float(kernel_energy(R_star, S)) < 1e-8
    assert float(kernel_energy(T, S)) > 0.1  # open loop wastes residual
    assert float(alignment(R_star, S)) > float(alignment(T, S))

    # iterative solve of the upper problem, starting at the open-loop target
    V = (Z0 + T).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [V],
        lr=1.0,
        max_iter=500,
        history_size=50,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        with torch.no_grad():
            delta = (V - Z0) @ A
            misfit = delta @ K1 - T
            loss = 0.5 * misfit.pow(2).sum() + gamma * (V - Z0).pow(2).sum()
            V.grad = proxy_hypergradient(misfit @ K1.T, A, V, Z0, gamma)
        return loss

    for _ in range(5):
        opt.step(closure)
    R_iter = V.detach() - Z0
    assert _rel(R_iter, R_star) < 1e-7
    assert float(kernel_energy(R_iter, S)) < 1e-8


def test_anchor_at_open_loop_target_keeps_its_kernel_component() -> None:
    """With the proximal term anchored at the open-loop target V0 (gamma |V - V0|^2), the
    stationary residual is R0 + M A^T: the learned *shift* V* - V0 has no kernel energy, but
    the kernel component of R0 survives unchanged. Kernel energy of R* itself only drops
    relative to |R*| (or when the anchor is W K1 / gamma -> 0)."""
    p = _problem(8)
    K1, P, T = p["K1"], p["P"], p["T"]
    S = realisation_operator(alphaedit_A(K1, P, lam=1.0), K1)
    g = _gen(9)
    R0 = _randn(g, *T.shape)  # open-loop residual used as the anchor
    R_star = _upper_optimum(S, T, 1e-2, R0)
    gains, U = torch.linalg.eigh(S)
    N = U[:, gains.abs() <= 1e-6] @ U[:, gains.abs() <= 1e-6].T
    assert float(kernel_energy(R_star - R0, S)) < 1e-8
    assert _rel(R_star @ N, R0 @ N) < 1e-8


# ------------------------------------------------------------------------------------------
# the virtual look-ahead hook
# ------------------------------------------------------------------------------------------


def test_virtual_lookahead_equals_real_single_layer_write() -> None:
    p = _problem(10)
    W, K1, P, T = p["W"], p["K1"], p["P"], p["T"]
    g = _gen(11)
    A = alphaedit_A(K1, P, p["Kp"] @ p["Kp"].T, lam=2.0)
    Z0 = W @ K1
    V = Z0 + T
    delta = (V - Z0) @ A
    keys = _randn(g, 3, 5, K1.shape[0])  # (batch, seq, d_in) token keys
    h = keys @ W.T  # token states W k
    out = virtual_lookahead(h, keys, V, Z0, A)
    assert out.shape == h.shape
    assert _rel(out, keys @ (W + delta).T) < 1e-12
    # at the edit keys themselves the hook realises Z0 + R S
    out_k = virtual_lookahead((W @ K1).T, K1.T, V, Z0, A)
    assert _rel(out_k.T, Z0 + T @ realisation_operator(A, K1)) < 1e-12
    with pytest.raises(ValueError):
        virtual_lookahead(h, keys[:, :4], V, Z0, A)


def test_dtypes_float32_and_bf16() -> None:
    p = _problem(12)
    K1, P, W, T = (p[k].float() for k in ("K1", "P", "W", "T"))
    A = alphaedit_A(K1, P)
    assert A.dtype == torch.float32
    S = realisation_operator(A, K1)
    Z0 = W @ K1
    for out in (
        S,
        key_feasibility(P, K1),
        realisation(Z0 + T, Z0, Z0 + T),
        z_error(Z0 + T, Z0, Z0 + T),
        alignment(T, S),
        kernel_energy(T, S),
        proxy_hypergradient(torch.ones_like(W), A, Z0 + T, Z0, 0.1),
    ):
        assert out.dtype == torch.float32
    h = (K1.T @ W.T).to(torch.bfloat16)
    out = virtual_lookahead(h, K1.T.to(torch.bfloat16), Z0 + T, Z0, A)
    assert out.dtype == torch.bfloat16
    assert out.shape == h.shape
    # bf16 diagnostics are computed in float32
    assert key_feasibility(P.bfloat16(), K1.bfloat16()).dtype == torch.float32
