"""NAMET (Dai et al., "NAMET: Robust Massive Model Editing via Noise-Aware Memory
Optimization", arXiv 2505.11876), as the authors' released code
(github.com/ybdai7/NAMET-massive-editing, ``namet/``; run by ``experiments/evaluate.py``)
computes it: MEMIT's multi-layer write of a residual built from a *noisy* target step.

Target step (:func:`namet_targets`), per request, on the current model, at the output of
the last edited layer l*: the rewrite prompts (one per context template, the target's tokens
but the last appended) and the KL prompt "{s} is a" form one batch, **left-padded** to its
longest row (the release sets ``tok.padding_side = 'left'`` for NAMET only: the paper's
"one-line modification" that injects the noise). The subject's last-token index is computed
on the unpadded text, so in a row with p pad tokens the value delta (d_model, one per
request) is added, and the initial value z0_p read, at the token p places earlier (a pad
slot when p exceeds the index); the target tokens sit at the end of every row and are
scored there (correct). With Z0 = [z0_1 .. z0_P] (d_model, P) over all P rows,

    loss = mean_rows NLL + kl_factor KL + v_weight_decay |delta| sqrt(P) / |Z0|_F,

Adam for ``v_num_grad_steps`` iterations (stop before the update once loss < ``stop_loss``,
1e-2 in the release; the last iteration only evaluates), |delta| clamped to
``clamp_norm_factor |Z0|_F``. The targets are z_p = z0_p + delta, one per row.

Write: for each edited layer l_i in order (current model, after the earlier layers'
writes), the residual of request j is the mean over the *prefixed* rewrite prompts t
(templates 1..T-1: neither the plain prompt nor the KL prompt) of z_t - h_t, h_t the state at
l* at the subject's last token of prompt t read correctly; R_i = residual / (L - i) is
written by MEMIT's solve with that layer's weight lambda_i (``mom2_update_weight`` is one per
layer):

    Delta_i = R_i K^T (lambda_i C0 + K K^T)^-1     (:func:`methods.solvers.memit_A`).

Context templates (:func:`namet_context_templates`): the release's ``generate_standard``
continuations of 12 starters (``namet_starters``; "Because" twice) by sampling (temperature
0.5, top-k 100, top-p 0.9, 10 new tokens), each "<text>. {}", after the plain "{}";
keys are averaged as MEMIT's ``compute_ks`` (half the plain prompt's key, half the prefixed
keys' mean).

``padding_side: right`` is the noise-free ablation (delta and z0 at the true subject token).
Differences from the release (none for SmolLM2 or Qwen): the release turns the tokenizer's BOS
token off (``tok.add_bos_token = False``; a no-op for tokenizers that add none); the states h_t
are read right-padded here (the release reads them left-padded at corrected indices: equal for
rotary position embeddings, not for GPT-2's learned positions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel, resolve_dtype
from harness.nethook import edit_output
from harness.scoring import encode_pair, unembed
from methods import locate
from methods.base import EditOutcome, EditRequest
from methods.keys import averaged_keys, keys_and_states, request_sites, subject_site, value_module
from methods.locate import LocateHparams
from methods.solvers import NumericalError, memit_A

NAME = "namet"
PADDING = ("left", "right")
STARTERS = ["The", "Therefore", "Because", "I", "You", "However", "Also", "Nevertheless", "He",
            "It", "Can", "Because"]


@dataclass
class Hparams(LocateHparams):
    """``mom2_update_weight``: MEMIT's lambda per edited layer; ``padding_side``: left (the
    release: the noise) | right (ablation); template generation ``namet_starters``,
    ``template_temperature``, ``template_top_k``, ``template_top_p``, ``template_tokens``
    (unused when ``context_template_texts`` is given)."""

    layers: list[int] = field(default_factory=lambda: [3, 4])
    mom2_update_weight: list[float] = field(default_factory=lambda: [7500.0, 15000.0])
    v_lr: float = 0.04
    stop_loss: float = 1e-2
    padding_side: str = "left"
    namet_starters: list[str] = field(default_factory=lambda: list(STARTERS))
    template_temperature: float = 0.5
    template_top_k: int = 100
    template_top_p: float = 0.9
    template_tokens: int = 10

    def validate(self) -> None:
        super().validate()
        if len(self.mom2_update_weight) != len(self.layers):
            raise UserError(f"hparams: 'mom2_update_weight' needs one lambda per layer "
                            f"({len(self.layers)}), got {self.mom2_update_weight}")
        if self.padding_side not in PADDING:
            raise UserError(f"hparams: field 'padding_side' must be one of "
                            f"{', '.join(PADDING)}, got {self.padding_side!r}")
        if self.n_context is not None:
            raise UserError("hparams: NAMET generates its own templates; set "
                            "context_template_texts to fix them, not n_context")
        if not self.namet_starters:
            raise UserError("hparams: 'namet_starters' must not be empty")


def namet_context_templates(lm: LoadedModel, hp: Hparams) -> list[str]:
    """``""`` plus one prefix per starter, generated as the release's ``generate_standard``
    (left-padded batch of the starters, sampling, full decoded text with the starter, braces
    replaced by spaces, then ". "); seeded by the run's seed; cached per model."""
    if hp.context_template_texts is not None:
        return locate.templates_for(lm, hp)
    seed = int(lm.info.get("seed", 0))
    key = ("namet", tuple(hp.namet_starters), hp.template_temperature, hp.template_top_k,
           hp.template_top_p, hp.template_tokens, seed)
    cache = lm.info.setdefault("_context_templates", {})
    if key in cache:
        return cache[key]
    tok = lm.tokenizer
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    old_side = tok.padding_side
    try:
        tok.padding_side = "left"
        enc = tok(list(hp.namet_starters), return_tensors="pt", padding=True).to(lm.device)
        with torch.inference_mode():
            ids = lm.model.generate(**enc, do_sample=True, max_new_tokens=hp.template_tokens,
                                    top_p=hp.template_top_p, top_k=hp.template_top_k,
                                    temperature=hp.template_temperature,
                                    pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = old_side
        torch.random.set_rng_state(state)
    texts = tok.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    out = [""] + [t.replace("{", " ").replace("}", " ") + ". " for t in texts]
    cache[key] = out
    return out


def prepare(lm: LoadedModel, hp: Hparams) -> None:
    """Runner hook (unedited model): statistics, projectors (the phi diagnostic) and the
    context templates."""
    locate.check_layers(lm, hp.layers)
    locate.projectors(lm, hp, hp.layers)
    namet_context_templates(lm, hp)


@dataclass
class _Rows:
    """One request's left- (or right-) padded batch: ``ids``/``mask`` (P, W); ``cols`` (P,)
    where delta goes in each row; ``tgt_cols`` (Lt,) the columns predicting the target tokens
    ``tgt`` (Lt,) in every rewrite row; P - 1 rewrite rows then the KL row."""

    ids: torch.Tensor
    mask: torch.Tensor
    cols: torch.Tensor
    tgt_cols: torch.Tensor
    tgt: torch.Tensor


def _request_rows(lm: LoadedModel, r: EditRequest, templates: list[str], hp: Hparams
                  ) -> _Rows:
    tok = lm.tokenizer
    seqs: list[list[int]] = []
    idx: list[int] = []
    t_ids: list[int] = []
    for ctx in templates:
        site = subject_site(tok, r.prompt, r.subject, prefix=ctx)
        p_ids, t_ids = encode_pair(tok, site.text, r.target_new)
        seqs.append(p_ids + t_ids[:-1])
        idx.append(site.position)
    site = subject_site(tok, hp.kl_prompt, r.subject)
    seqs.append(tok(site.text, add_special_tokens=True)["input_ids"])
    idx.append(site.position)
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        start = width - len(s) if hp.padding_side == "left" else 0
        ids[j, start:start + len(s)] = torch.tensor(s)
        mask[j, start:start + len(s)] = 1
    # delta goes at each row's unpadded subject index: right padding, the subject's last
    # token; left padding, the token as many places earlier as the row has pads (the noise)
    cols = idx
    if hp.padding_side == "left":
        tgt_cols = torch.arange(width - len(t_ids), width)
        tgt_cols = tgt_cols.expand(len(templates), -1)
    else:
        tgt_cols = torch.stack([torch.arange(len(s) - len(t_ids), len(s)) for s in seqs[:-1]])
    dev = lm.device
    return _Rows(ids.to(dev), mask.to(dev), torch.tensor(cols, device=dev), tgt_cols.to(dev),
                 torch.tensor(t_ids, device=dev))


def _optimise(lm: LoadedModel, rows: _Rows, name: str, hp: Hparams
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One request's target step (module notes): Z0 (d_model, P), delta (d_model,), info."""
    P = rows.ids.shape[0]
    ar = torch.arange(P, device=lm.device)
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(d_model, device=lm.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    rec: dict[str, torch.Tensor] = {}

    def fn(y: torch.Tensor) -> torch.Tensor:
        if "z0" not in rec:
            rec["z0"] = y[ar, rows.cols].detach().float().T.clone()  # (d, P)
        return y.index_put((ar, rows.cols), y[ar, rows.cols] + delta.to(y.dtype))

    n_tgt = len(rows.tgt)
    t_rows = torch.arange(P - 1, device=lm.device).repeat_interleave(n_tgt)
    init_kl = None
    first = last = float("nan")
    steps = 0
    with torch.enable_grad():
        for it in range(hp.v_num_grad_steps):
            with edit_output(lm.model, name, fn):
                hidden = lm.model.base_model(input_ids=rows.ids, attention_mask=rows.mask,
                                             use_cache=False).last_hidden_state
            logits = unembed(lm, torch.cat([hidden[t_rows, rows.tgt_cols.reshape(-1)],
                                            hidden[P - 1, rows.cols[P - 1]][None]]))
            logp = torch.log_softmax(logits, -1)
            tok_lp = logp[:-1].gather(1, rows.tgt.repeat(P - 1)[:, None])[:, 0]
            nll = -(tok_lp.view(P - 1, n_tgt).sum(1) / n_tgt).mean()
            kl_lp = logp[-1:]
            if init_kl is None:
                init_kl = kl_lp.detach().clone()
            kl = (kl_lp.exp() * (kl_lp - init_kl)).sum()
            z0 = rec["z0"]
            decay = hp.v_weight_decay * delta.norm() * P ** 0.5 / z0.norm()
            loss = nll + hp.kl_factor * kl + decay
            if it == 0:
                first = float(nll.detach())
            last = float(nll.detach())
            if float(loss.detach()) < hp.stop_loss or it == hp.v_num_grad_steps - 1:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * z0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    d = delta.detach()
    z0 = rec["z0"]
    info = {"target_nll_init": first, "target_nll_final": last, "target_steps": steps,
            "delta_norm": float(d.norm()),
            "delta_clamped": bool(d.norm() >= hp.clamp_norm_factor * z0.norm() * (1 - 1e-4))}
    return z0, d, info


def namet_targets(lm: LoadedModel, requests: list[EditRequest], layer: int, hp: Hparams,
                  templates: list[str]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[str, Any]]]:
    """Per request: Z0 (d_model, P) initial values at each row's insertion point and the
    targets Z = Z0 + delta (d_model, P), P = len(templates) + 1 (module notes); and info.
    Each request is optimised on its own batch (its own padding width), as the release."""
    name = value_module(lm, layer, hp.value_site)
    Z0s, Zs, info = [], [], []
    for r in requests:
        z0, d, i = _optimise(lm, _request_rows(lm, r, templates, hp), name, hp)
        Z0s.append(z0)
        Zs.append(z0 + d[:, None])
        info.append(i)
    return Z0s, Zs, info


def namet_residual(Zs: list[torch.Tensor], H: torch.Tensor) -> torch.Tensor:
    """(d_model, n): request j's residual mean_t (Z_j[:, t] - H[j, t]) over the prefixed
    rewrite prompts t = 1..T-1; ``Zs[j]`` (d_model, T + 1) its targets (plain prompt first,
    KL prompt last), ``H`` (n, T, d_model) the current states at the true subject tokens."""
    return torch.stack([(Z[:, 1:-1] - H[j, 1:].T).mean(1) for j, Z in enumerate(Zs)], dim=1)


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    hp = hparams
    P, timings = locate.start_batch(lm, hp)
    C0, _, _ = locate.layer_statistics(lm, hp, hp.layers)  # cached by the projectors' call
    last = hp.layers[-1]
    templates = namet_context_templates(lm, hp)
    if len(templates) < 2:
        raise UserError("hparams: NAMET's residual averages over the prefixed prompts; "
                        "it needs at least one context template besides the plain prompt")
    t0 = time.perf_counter()
    _, Zs, info = namet_targets(lm, requests, last, hp, templates)
    timings["target_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sdt = resolve_dtype(hp.solve_dtype)
    sites = request_sites(lm, requests, templates)
    T = len(templates)
    _, Zpre = averaged_keys(lm, requests, templates[:1], [], [last], value_site=hp.value_site)
    keys, norms = {}, {}
    R_first = torch.empty(0)
    for i, layer in enumerate(hp.layers):
        K, _ = averaged_keys(lm, requests, templates, [layer], [], hp.key_averaging)
        _, H = keys_and_states(lm, sites, [], [last], hp.value_site)
        R = namet_residual(Zs, H[last].view(len(requests), T, -1)).to(sdt)
        if i == 0:
            R_first = R
        R_l = R / (len(hp.layers) - i)
        A = memit_A(K[layer].to(sdt), C0[layer].to(sdt), hp.mom2_update_weight[i])
        delta = R_l @ A
        if not bool(torch.isfinite(delta).all()):
            raise NumericalError(f"non-finite update at layer {layer}")
        lm.apply_delta(layer, delta)
        keys[layer], norms[layer] = K[layer], float(delta.norm())
    timings["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = locate.WriteResult(keys=keys, A={}, update_norms=norms, residual_first=R_first)
    V = Zpre[last] + R_first.to(Zpre[last].dtype)  # the planned residual, at the plain prompt
    diags = locate.diagnostics(lm, requests, hp, Zpre[last], V, templates, written, P[last],
                               info)
    timings["diagnostics_s"] = time.perf_counter() - t0
    return EditOutcome(diagnostics=diags, state=state, timings=timings)
