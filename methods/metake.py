"""MetaKE: knowledge editing as bi-level optimisation (arXiv 2603.12677), as derived in
docs/METAKE.md.

Lower level: a locate-then-edit solver, linear in the target: Delta(V) = (V - Z0) A with
A = A(K1, ...) (AlphaEdit by default; MEMIT, or ROME as the negative control).
Upper level: learn the targets V through that solver,

    min_V  sum_i [ NLL_i(W + Delta(V)) + beta KL_i(W + Delta(V))
                   + gamma |v_i - v0_i|^2 / |z0_i|^2 ]

starting from the open-loop targets V0 (the ROME/MEMIT target step). The Structural Gradient
Proxy holds A fixed (stop-gradient) and applies the single-layer write virtually at the proxy
layer l*: every token's rewrite-module output W k becomes (W + (V - Z0) A) k ("virtual
look-ahead"), so autograd gives exactly grad_V = (grad_Delta L) A^T + 2 gamma (V - V0)
(``methods.alignment.proxy_hypergradient``) without back-propagating through solves or
through several edited layers. After T Adam steps V* is written once by the unmodified
multi-layer solver.

The proxy layer's keys are context-averaged (as the solver's); with ``prefix_cache`` the
tokens before each subject's last token are read from the unedited model's cache, so the
virtual write reaches the subject site and everything after it (where the edit acts), not
the context prefix.

``write_plan: blue`` puts the upper level over BLUE's lower level (:mod:`methods.memit_blue`,
arms ``metake-blue`` over AlphaEdit-BLUE and ``metake-<solver>-blue``): every boundary layer l
gets its own target V_l at its own output, refined through the proxy at l (there the virtual
single-layer write is BLUE's real write, Delta_l = (V_l - Z_l) A_l), then written before the
next layer's target step.
The proxy does not apply where the lower level is not linear in the target: PRUNE (the
singular values of the accumulated edit are restrained by a log map), RECT (only the top-k%
relative changes of each weight are kept: a data-dependent mask) and FT-L (gradient steps).
r-ROME is ROME's closed form with a different key (``solver: rome`` covers that solve).
Over ENCORE (``solver: encore``, arm ``metake-encore``) the lower level is ENCORE's
norm-constrained write with the earlier batches' keys (:mod:`methods.encore`); MPES, a rule
of the open-loop target step, is not part of it (the upper level replaces that step's result).

``proxy: false`` is the ablation S := I (``metake-noproxy``): the same outer steps with the
target added at the subject site as in the open-loop step, i.e. without the solver in the
loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from methods import alignment, alphaedit, emmet, encore, memit, rome
from methods.base import EditOutcome, EditRequest
from methods.keys import averaged_keys, value_module
from methods.locate import Solver, edit_batch, layer_statistics, projectors
from methods.locate import prepare as prepare  # runner hook
from methods.memit_blue import edit_blue
from methods.solvers import alphaedit_A, emmet_A, memit_A, rome_A
from methods.targets import TargetProblem, add_at_sites

NAME = "metake"
SOLVERS = ("alphaedit", "memit", "rome", "emmet", "encore")
#: lower levels whose solve carries the earlier batches' keys (state ``prev_cov.<layer>``)
ACCUMULATING = ("alphaedit", "encore")
WRITE_PLANS = ("spread", "blue")


@dataclass
class Hparams(alphaedit.Hparams):
    """Upper level: ``outer_steps`` Adam steps of size ``outer_lr`` on V, locality weight
    ``beta``, proximity weight ``gamma`` (scaled by |z0|^2 per edit), targets clamped to
    ``outer_clamp_factor * |z0|`` from z0. ``solver``: the lower level (alphaedit | memit |
    rome | emmet | encore); ``mom2_update_weight`` is MEMIT's lambda (and EMMET's and
    ENCORE's lambda_m) when solver is memit (emmet, encore), ``emmet_lambda`` /
    ``update_norm_lambda`` EMMET's mu_e / mu_u (ENCORE's norm constraint mu)
    (:mod:`methods.emmet`). ``proxy_layer``: layer carrying the proxy (None: the last edited
    layer). ``write_plan``: ``spread`` (the solver's own: one target at the last layer, the
    residual spread over ``layers``) or ``blue`` (BLUE's: each listed layer its own target,
    refined through the proxy at that layer; module notes)."""

    solver: str = "alphaedit"
    mom2_update_weight: float = 15000.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0
    outer_steps: int = 10
    outer_lr: float = 0.5
    beta: float = 0.0625
    gamma: float = 0.1
    outer_clamp_factor: float = 3.0
    proxy: bool = True
    proxy_layer: int | None = None
    write_plan: str = "spread"

    def validate(self) -> None:
        super().validate()
        if self.solver not in SOLVERS:
            raise UserError(f"metake hparams: solver must be one of {SOLVERS}, "
                            f"got {self.solver!r}")
        if self.solver == "rome" and len(self.layers) != 1:
            raise UserError("metake hparams: solver rome needs exactly one layer")
        if self.write_plan not in WRITE_PLANS:
            raise UserError(f"metake hparams: write_plan must be one of {WRITE_PLANS}, "
                            f"got {self.write_plan!r}")
        if self.write_plan == "blue" and (self.solver == "rome" or self.proxy_layer is not None):
            raise UserError("metake hparams: write_plan blue needs solver alphaedit, memit or "
                            "emmet and no proxy_layer (the proxy sits at each boundary layer)")
        if self.outer_steps < 0 or self.outer_lr <= 0 or self.gamma < 0 or self.beta < 0:
            raise UserError("metake hparams: outer_steps/gamma/beta >= 0, outer_lr > 0")
        if self.proxy_layer is not None and self.proxy_layer not in self.layers:
            raise UserError(f"metake hparams: proxy_layer {self.proxy_layer} is not one of "
                            f"the edited layers {self.layers}")


def proxy_A(lm: LoadedModel, hp: Hparams, layer: int, K1: torch.Tensor, P: dict[int, Any],
            state: dict[str, Any]) -> torch.Tensor:
    """The lower-level solver's A (n, d_in) at ``layer`` for keys K1 (d_in, n), float64."""
    K = K1.double()
    if hp.solver == "alphaedit":
        prev = state.get(alphaedit.state_key(layer))
        return alphaedit_A(K, P[layer].double(), prev_cov=None if prev is None
                           else prev.double(), lam=hp.L2)
    C0, _, _ = layer_statistics(lm, hp, [layer])
    if hp.solver == "memit":
        return memit_A(K, C0[layer].double(), hp.mom2_update_weight)
    if hp.solver == "emmet":
        ridge = hp.emmet_lambda if K.shape[1] > 1 else 0.0
        return emmet_A(K, emmet.preservation_matrix(C0[layer].double(), hp), ridge)
    if hp.solver == "encore":
        prev = state.get(alphaedit.state_key(layer))
        return encore.encore_A(K, C0[layer].double(), hp.mom2_update_weight,
                               hp.update_norm_lambda, None if prev is None else prev.double())
    return rome_A(K[:, 0], C0[layer].double())


@contextmanager
def virtual_write(lm: LoadedModel, layer: int, delta: torch.Tensor) -> Iterator[None]:
    """Inside the block the rewrite module of ``layer`` computes (W + delta) k for every
    token: output + k delta^T, with delta (d_out, d_in) differentiable."""
    module = lm.module(lm.spec.rewrite(layer))

    def hook(_mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        k = args[0]
        return out + (k.to(delta.dtype) @ delta.T).to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise cosine of (d, n) matrices; NaN where a column is zero."""
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def _defined(values: torch.Tensor, *columns: torch.Tensor) -> list[float | None]:
    """``values`` (n,) as floats, ``None`` for request i where a column i of any of ``columns``
    ((d, n) each) is exactly zero: the ratio is 0/0 there, undefined rather than a numerical
    failure (e.g. under BLUE a request whose first boundary write already reached its target
    leaves nothing to write at the next layer, V0 = Z0). A NaN anywhere else stays NaN."""
    zero = torch.zeros_like(values, dtype=torch.bool)
    for c in columns:
        zero |= c.norm(dim=0) == 0
    return [None if z else float(v) for v, z in zip(values.tolist(), zero.tolist(), strict=True)]


def predicted_realisation(R: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """(n,) rho predicted by the proxy: <(R S)_i, R_i> / |R_i|^2."""
    RS = R @ S
    return (RS * R).sum(0) / (R * R).sum(0)


def refine(lm: LoadedModel, requests: Sequence[EditRequest], hp: Hparams, Z0: torch.Tensor,
           V0: torch.Tensor, problem: TargetProblem, templates: Sequence[str],
           P: dict[int, Any], state: dict[str, Any], at: int | None = None
           ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The upper level: V* from V0 by ``outer_steps`` Adam steps through the proxy.

    Z0, V0: (d_model, n), at the output of the last edited layer, or of layer ``at`` when
    given (BLUE's plan: the target of boundary layer ``at``, whose write the proxy then is).
    Returns V* (d_model, n) and per-edit diagnostics.
    """
    target_layer = hp.layers[-1] if at is None else at
    layer = at if at is not None else (hp.proxy_layer if hp.proxy_layer is not None
                                       else hp.layers[-1])
    if problem.start is not None and problem.start["layer"] > layer:
        problem.skip_lower_layers(layer)  # the proxy's hook must run: start at or below it
    K, _ = averaged_keys(lm, requests, templates, [layer], averaging=hp.key_averaging)
    A = proxy_A(lm, hp, layer, K[layer], P, state)  # (n, d_in) float64, held fixed
    S = A @ K[layer].double()  # (n, n): the solver's realisation on the edit keys
    z0n2 = Z0.norm(dim=0) ** 2
    max_norm = hp.outer_clamp_factor * Z0.norm(dim=0)
    V = V0.clone().requires_grad_(True)
    opt = torch.optim.Adam([V], lr=hp.outer_lr)
    A32 = A.float()
    last_layer_name = value_module(lm, target_layer, hp.value_site)
    grad0 = torch.zeros_like(V0)
    nll_first = nll_last = torch.full((len(requests),), float("nan"))

    def proxy_hooks() -> Any:
        return virtual_write(lm, layer, (V - Z0) @ A32)

    with torch.enable_grad():
        for step in range(hp.outer_steps + 1):
            hooks = (proxy_hooks if hp.proxy
                     else add_at_sites(problem, last_layer_name, (V - Z0).T))
            nll, kl = problem.losses(hooks)
            prox = ((V - V0) ** 2).sum(0) / z0n2
            loss = nll + hp.beta * kl + hp.gamma * prox
            if step == 0:
                nll_first = nll.detach().cpu()
            nll_last = nll.detach().cpu()
            if step == hp.outer_steps:
                break  # the last pass only measures
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            if step == 0:
                grad0 = V.grad.detach().clone()
            opt.step()
            with torch.no_grad():
                shift = V - Z0
                scale = torch.clamp(max_norm / shift.norm(dim=0).clamp_min(1e-12), max=1.0)
                V.copy_(Z0 + shift * scale)
    Vs = V.detach()
    R0, Rs = (V0 - Z0).double(), (Vs - Z0).double()
    shift = (Vs - V0).double()
    cos = _defined(_cos(shift, -grad0.double()), shift, grad0)
    rho0 = _defined(predicted_realisation(R0, S), R0)
    rhos = _defined(predicted_realisation(Rs, S), Rs)
    batch = {
        "alignment": float(alignment.alignment(Rs, S)),
        "kernel_energy": float(alignment.kernel_energy(Rs, S)),
        "alignment_open_loop": float(alignment.alignment(R0, S)),
        "kernel_energy_open_loop": float(alignment.kernel_energy(R0, S)),
    }
    info = [{**batch,
             "shift_norm": float(shift[:, i].norm()),
             "shift_cos": cos[i],
             "rho_pred": rhos[i], "rho_pred_open_loop": rho0[i],
             "proxy_nll_open_loop": float(nll_first[i]), "proxy_nll_final": float(nll_last[i])}
            for i in range(len(requests))]
    return Vs, info


def _solver(lm: LoadedModel, hp: Hparams, state: dict[str, Any]) -> Solver:
    if hp.solver == "alphaedit":
        return alphaedit.solver_for(lm, hp, state, hp.L2)
    if hp.solver == "memit":
        return memit.solver_for(lm, hp)
    if hp.solver == "emmet":
        return emmet.solver_for(lm, hp)
    if hp.solver == "encore":
        return encore.solver_for(lm, hp, state, hp.mom2_update_weight, hp.update_norm_lambda,
                                 True)
    return rome.solver_for(lm, hp)


def edit_with(lm: LoadedModel, requests: list[EditRequest], hp: Hparams,
              state: dict[str, Any], refine_fn: Any) -> EditOutcome:
    """Target step -> ``refine_fn`` -> write with the configured solver (ROME: one at a
    time); AlphaEdit's accumulated keys are carried in the state."""
    if hp.write_plan == "blue":
        P = projectors(lm, hp, hp.layers)

        def refine_at(layer: int, Z0: torch.Tensor, V: torch.Tensor, problem: TargetProblem,
                      templates: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
            return refine_fn(lm, requests, hp, Z0, V, problem, templates, P, state, at=layer)

        diags, written, timings = edit_blue(lm, requests, hp, _solver(lm, hp, state),
                                            refine_at)
        if hp.solver in ACCUMULATING:
            state = alphaedit.accumulate(state, written.keys)
        return EditOutcome(diagnostics=diags, state=state, timings=timings)
    groups = [[r] for r in requests] if hp.solver == "rome" else [requests]
    diags: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for group in groups:
        d, written, t = edit_batch(lm, group, hp, lambda h, st: _solver(lm, h, st), state,
                                   refine=refine_fn)
        if hp.solver in ACCUMULATING:
            state = alphaedit.accumulate(state, written.keys)
        diags += d
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    return EditOutcome(diagnostics=diags, state=state, timings=timings)


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    return edit_with(lm, requests, hparams, state, refine)
