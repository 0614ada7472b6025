"""Ablation ``alphaedit-rescaled``: the open-loop target with its residual divided by the
solver's predicted realisation, v_i = z0_i + (v0_i - z0_i) / rho_i, with
rho_i = <(R S)_i, R_i> / |R_i|^2 from the proxy layer's S = A K1 (METAKE.md: for one edit the
solver shrinks by rho = |Pk|^2 / (lambda + |Pk|^2)). 1/rho is capped at ``max_rescale`` and the
target clamped like MetaKE's. Tests whether a per-edit scalar fixes what MetaKE learns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from methods import metake
from methods.base import EditOutcome, EditRequest
from methods.keys import averaged_keys
from methods.metake import prepare as prepare  # runner hook

NAME = "alphaedit-rescaled"


@dataclass
class Hparams(metake.Hparams):
    max_rescale: float = 10.0


def rescale(lm: Any, requests: Sequence[EditRequest], hp: Hparams, Z0: torch.Tensor,
            V0: torch.Tensor, problem: Any, templates: Sequence[str], P: dict[int, Any],
            state: dict[str, Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    layer = hp.proxy_layer if hp.proxy_layer is not None else hp.layers[-1]
    K, _ = averaged_keys(lm, requests, templates, [layer], averaging=hp.key_averaging)
    A = metake.proxy_A(lm, hp, layer, K[layer], P, state)
    S = A @ K[layer].double()
    R0 = (V0 - Z0).double()
    rho = metake.predicted_realisation(R0, S)
    factor = (1.0 / rho.clamp_min(1.0 / hp.max_rescale)).clamp(max=hp.max_rescale)
    R = R0 * factor
    max_norm = hp.outer_clamp_factor * Z0.norm(dim=0).double()
    R = R * torch.clamp(max_norm / R.norm(dim=0).clamp_min(1e-12), max=1.0)
    V = (Z0.double() + R).to(V0.dtype)
    info = [{"rho_pred_open_loop": float(rho[i]), "rescale": float(factor[i]),
             "shift_norm": float((V[:, i] - V0[:, i]).norm())} for i in range(len(requests))]
    return V, info


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    return metake.edit_with(lm, requests, hparams, state, rescale)
