"""UltraEdit (Gu et al., "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in
Large Language Models", arXiv 2505.14679), as the authors' released code
(github.com/XiaojieGu/UltraEdit, ``editor/ultraedit.py``, ``nets.RunningMeanStd``) edits.

No target step, no subject position, no corpus statistics and no memory of earlier edits.
For a batch of requests, in chunks of ``chunk_size`` (the release's ``dataset.batch_size``
tuples; the batch is first sorted by sequence length, longest first, as its collate does):

1. one forward/backward of the cross-entropy of ``target_new`` after the rewrite prompt (the
   mean over the chunk's target tokens, teacher forced) on the current model; at every edited
   module (the release's ``edit_modules``: linear modules by full name, as Llama-3's
   ``model.layers.11.mlp.gate_proj``; without them, the rewrite matrix W of each of
   ``layers``) keep, for each *answer position* (the
   positions predicting a target token), its input k (d_in) and the gradient g of the loss
   with respect to its output (d_out);
2. the lifelong normaliser (running mean and variance of the concatenated features [k; g],
   one per module shape, shared by all modules of that shape and updated module after module,
   chunk after chunk: :func:`methods.solvers.lifelong_stats_update`) absorbs the rows.

Then for every module, with the batch's keys K (d_in, N) and gradients G (d_out, N) over its
N answer tokens, normalised by the statistics so far (:func:`methods.solvers.lifelong_normalize`)
into K_hat, G_hat:

    V[:, t] = -lr |k_hat_t|^2 g_hat_t                     (value features, (d_out, N))
    Delta   = V K^T (K K^T + I)^-1 = V (K^T K + I)^-1 K^T   (raw keys; ridge 1)

(:func:`methods.solvers.ultraedit_values`, :func:`methods.solvers.ultraedit_A`), and every
W += Delta once all are computed. The statistics are the only state carried
(``ultra.<d_in>x<d_out>.{n,mean,var}``), which is what makes the shift scale with the stream.

Differences from the release, none of which changes a number here: the release solves the
(d_in, d_in) system (the push-through form above solves (N, N)); it chunks the normalisation
into editor batches (a row-wise operation). The release edits ``gate_proj``/``up_proj`` for
Llama-3 and Qwen2.5 (``down_proj`` for Mistral, ``fc_out`` for GPT-J); the files for those
models name the same modules in ``edit_modules``, which the loop snapshots, restores and
checkpoints with the rewrite matrices (``harness.loop.edited_weights``). The toolkit
EasyEdit's port reads keys at every prompt token (``token: mask``); the release and this
module read them at the answer positions (``token: ans``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import UserError
from harness.models import LoadedModel, resolve_dtype
from harness.scoring import encode_pair, mean_nll, pack, unembed
from methods.base import EditOutcome, EditRequest
from methods.solvers import (
    NumericalError,
    lifelong_normalize,
    lifelong_stats_update,
    ultraedit_A,
    ultraedit_values,
)

NAME = "ultraedit"


@dataclass
class Hparams:
    """``layers``: the edited rewrite matrices; ``edit_modules``: instead of them, linear
    modules by full name, edited in this order (the release's ``model.edit_modules``);
    ``lr``: the value-feature step (the release's ``editor.lr``); ``chunk_size``: requests
    per forward/backward and per normaliser update (the release's ``dataset.batch_size``);
    ``ridge``: the closed form's ridge (1 in the release); ``solve_dtype``: dtype of the
    solve."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    edit_modules: list[str] = field(default_factory=list)
    lr: float = 1e-6
    chunk_size: int = 10
    ridge: float = 1.0
    solve_dtype: str = "float64"

    def validate(self) -> None:
        if self.edit_modules:
            if self.layers:
                raise UserError("hparams: give 'layers' (rewrite matrices) or 'edit_modules' "
                                "(modules by name), not both: with edit_modules set layers: [] "
                                "(--set layers=[]); to edit the rewrite matrices of layers "
                                "instead, --set edit_modules=[]")
            if len(set(self.edit_modules)) != len(self.edit_modules):
                raise UserError(f"hparams: 'edit_modules' names a module twice: "
                                f"{self.edit_modules}")
        elif not self.layers:
            raise UserError("hparams: 'layers' must name at least one layer "
                            "(or 'edit_modules' at least one module)")
        if sorted(set(self.layers)) != list(self.layers):
            raise UserError(f"hparams: 'layers' must be strictly increasing, got {self.layers}")
        if self.chunk_size < 1 or self.ridge <= 0:
            raise UserError("hparams: chunk_size must be >= 1 and ridge > 0")
        resolve_dtype(self.solve_dtype)


def stats_key(d_in: int, d_out: int) -> str:
    return f"ultra.{d_in}x{d_out}"


def _stats(state: dict[str, Any], key: str, d: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if f"{key}.n" in state:
        return (state[f"{key}.n"].float(), state[f"{key}.mean"].float(),
                state[f"{key}.var"].float())
    z = torch.zeros(d, dtype=torch.float32, device=device)
    return torch.zeros(1, dtype=torch.float32, device=device), z, z.clone()


def chunks_by_length(lm: LoadedModel, requests: list[EditRequest], size: int
                     ) -> list[list[int]]:
    """Request indices in chunks of ``size``, longest prompt+target first (a stable sort, as
    the release's collate sorts by attention-mask sum)."""
    lengths = []
    for r in requests:
        p, t = encode_pair(lm.tokenizer, r.rewrite_prompt, r.target_new)
        lengths.append(len(p) + len(t) - 1)
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


def edited_modules(lm: LoadedModel, hp: Hparams) -> list[str]:
    """Full names of the edited modules, in the order they are edited: ``edit_modules``, or
    the rewrite module of each of ``layers``."""
    return list(hp.edit_modules) or [lm.spec.rewrite(layer) for layer in hp.layers]


def keys_and_grads(lm: LoadedModel, requests: list[EditRequest], names: list[str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One forward/backward of the chunk's mean target cross-entropy. Per module of ``names``
    (full names): its input keys (N, d_in) and output gradients (N, d_out) at the N answer
    positions (float32, row order = the packed target tokens); and the per-request mean NLL
    (n,)."""
    tok = lm.tokenizer
    batch = pack(tok, [encode_pair(tok, r.rewrite_prompt, r.target_new) for r in requests],
                 lm.device)
    keys: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def hooks(name: str) -> Any:
        def fwd(_mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            keys[name] = args[0][batch.rows, batch.cols].detach().float()

            def grab(g: torch.Tensor) -> None:
                grads[name] = g[batch.rows, batch.cols].detach().float()

            out.register_hook(grab)
        return fwd

    weights = [lm.module(name).weight for name in names]
    flags = [w.requires_grad for w in weights]
    try:
        for name in names:
            handles.append(lm.module(name).register_forward_hook(hooks(name)))
        for w in weights:  # the graph must reach the edited modules' outputs (as the release)
            w.requires_grad_(True)
        with torch.enable_grad():
            hidden = lm.model.base_model(input_ids=batch.input_ids,
                                         attention_mask=batch.attention_mask,
                                         use_cache=False).last_hidden_state
            logits = unembed(lm, hidden[batch.rows, batch.cols])
            F.cross_entropy(logits, batch.targets).backward()
    finally:
        for h in handles:
            h.remove()
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
            w.grad = None
    with torch.no_grad():
        lp = torch.log_softmax(logits.detach(), -1).gather(1, batch.targets[:, None])[:, 0]
        seg = torch.repeat_interleave(torch.arange(len(requests), device=lp.device),
                                      torch.tensor(batch.lengths, device=lp.device))
        nll = -torch.zeros(len(requests), device=lp.device).index_add(0, seg, lp) / \
            torch.tensor(batch.lengths, device=lp.device, dtype=lp.dtype)
    return keys, grads, nll


@torch.no_grad()
def target_nll(lm: LoadedModel, requests: list[EditRequest]) -> torch.Tensor:
    """(n,) mean per-token NLL of target_new after the rewrite prompt."""
    return mean_nll(lm, [r.rewrite_prompt for r in requests], [r.target_new for r in requests])


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    hp = hparams
    bad = [layer for layer in hp.layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise UserError(f"hparams: layers {bad} outside 0..{lm.n_layers - 1} for {lm.name}")
    names = edited_modules(lm, hp)
    timings: dict[str, float] = {}
    sdt = resolve_dtype(hp.solve_dtype)
    new_state = dict(state)
    t0 = time.perf_counter()
    K: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    G: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    nll0 = torch.full((len(requests),), float("nan"))
    n_tokens = [0] * len(requests)
    for chunk in chunks_by_length(lm, requests, hp.chunk_size):
        reqs = [requests[i] for i in chunk]
        keys, grads, nll = keys_and_grads(lm, reqs, names)
        for j, i in enumerate(chunk):
            nll0[i] = float(nll[j])
        for name in names:  # the release: module after module, per chunk
            k, g = keys[name], grads[name]
            key = stats_key(k.shape[1], g.shape[1])
            n, mean, var = _stats(new_state, key, k.shape[1] + g.shape[1], k.device)
            n, mean, var = lifelong_stats_update(n, mean, var, torch.cat([k, g], 1))
            new_state.update({f"{key}.n": n, f"{key}.mean": mean, f"{key}.var": var})
            K[name].append(k)
            G[name].append(g)
    for i, r in enumerate(requests):
        n_tokens[i] = len(encode_pair(lm.tokenizer, r.rewrite_prompt, r.target_new)[1])
    timings["gradient_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deltas: dict[str, torch.Tensor] = {}
    for name in names:
        k, g = torch.cat(K[name]), torch.cat(G[name])  # (N, d_in), (N, d_out)
        key = stats_key(k.shape[1], g.shape[1])
        z = lifelong_normalize(torch.cat([k, g], 1), new_state[f"{key}.n"],
                               new_state[f"{key}.mean"], new_state[f"{key}.var"])
        k_hat, g_hat = z[:, :k.shape[1]], z[:, k.shape[1]:]
        V = ultraedit_values(k_hat.T.to(sdt), g_hat.T.to(sdt), hp.lr)  # (d_out, N)
        delta = V @ ultraedit_A(k.T.to(sdt), hp.ridge)  # (d_out, d_in)
        if not bool(torch.isfinite(delta).all()):
            raise NumericalError(f"non-finite update at {name}")
        deltas[name] = delta
    for name, delta in deltas.items():
        lm.apply_delta(name, delta)
    timings["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll1 = target_nll(lm, requests).cpu()
    timings["diagnostics_s"] = time.perf_counter() - t0
    upd = sum(float(d.norm()) for d in deltas.values())
    diags = [{"target_nll_init": float(nll0[i]), "target_nll_final": float(nll1[i]),
              "answer_tokens": n_tokens[i], "update_norm": upd} for i in range(len(requests))]
    return EditOutcome(diagnostics=diags, state=new_state, timings=timings)
