"""The open-loop target step of ROME/MEMIT/AlphaEdit (``compute_z``), batched over requests.

For request i with rewrite prompt p_i, subject s_i and new object o_i, find a residual
delta_i (d_model) that, added to the output of decoder layer l* at the subject's last token,
makes the model produce o_i:

    L_i(delta) = NLL_i + kl_factor * KL_i + v_weight_decay * |delta| / |z0_i|^2

* NLL_i: mean over the context templates c of the mean-per-token negative log-likelihood of
  o_i after ``c + p_i`` (ROME eq. for v*, with the prefixes of Meng et al. 2022/2023);
* KL_i: KL(P_delta || P_0) of the next-token distribution at the subject's last token of
  "{s_i} is a" (essence drift), against the unedited model's;
* the decay term follows the published implementation's formula |delta| / |z0|^2;
* after every Adam step |delta_i| is clamped to ``clamp_norm_factor * |z0_i|`` where z0_i is
  the unedited value at the plain prompt's subject token;
* the loop (``v_num_grad_steps = n``, the published code's): n iterations, each evaluates
  the loss and stops the request once it is below ``stop_loss`` (5e-2); all but the last
  iteration then take an Adam step, so at most n - 1 updates. ``v_steps = m`` (the
  ``tuned`` preset's loop) instead takes exactly m updates (m iterations,
  each stepping) and replaces ``v_num_grad_steps``.

Where the value sits (``value_site``, :func:`methods.keys.value_module`): ``residual`` adds
delta to the decoder layer's output (MEMIT/AlphaEdit ``compute_z``), ``mlp`` to the MLP
output (ROME ``compute_v``); z0 and the clamp are read at the same module.

All requests of a batch are optimised together in one forward/backward per step; rows of
different requests never interact (each batch row holds one prompt), and a request whose loss
falls below ``stop_loss`` is frozen, so the result equals per-request optimisation.
The target is v_i = z0_i + delta_i.

Speed (results unchanged, tested against the plain full forward): with ``prefix_cache`` the
tokens before each subject site run once and later steps run only the suffix; with
``skip_lower_layers`` the suffix's input to layer l* is computed once too, so each step runs
layers l*..L-1 only; on CPU, rows are grouped by suffix length so that padding costs little.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.models import LoadedModel
from harness.nethook import capture_outputs, edit_output, stop_after
from harness.scoring import encode_pair, logits_at, unembed
from methods.base import EditRequest
from methods.keys import subject_site, value_module


@dataclass
class TargetHparams:
    """Hyperparameters of the target step (names as in the published hparams files).
    ``v_num_grad_steps``: the published loop (at most n - 1 Adam updates); ``v_steps``: when
    set, the tuned preset's loop of exactly that many updates instead (module notes).
    ``value_site``: ``residual`` | ``mlp``, where delta is added (module notes).
    ``prefix_cache`` and ``skip_lower_layers`` only change speed (see the module notes)."""

    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_steps: int | None = None
    value_site: str = "residual"
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    prefix_cache: bool = True
    skip_lower_layers: bool = True


def _cache_kwarg(lm: LoadedModel, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword of this transformers version (``cache``; ``past_key_values``
    before 5.x)."""
    params = inspect.signature(lm.model.base_model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


BUCKET_OVERHEAD_TOKENS = 48
"""Fixed cost of one more forward/backward call on CPU, in padded suffix tokens (measured on
SmolLM2 with 2 threads: per-call op overhead and the lower matmul efficiency of small calls)."""


def group_lengths(lengths: Sequence[int], counts: Sequence[int], overhead: float
                  ) -> list[tuple[int, int]]:
    """Split sorted distinct suffix ``lengths`` (with ``counts`` rows each) into contiguous
    groups ``(lo, hi)`` minimising ``sum_g rows_g * hi_g + overhead * n_groups``: the padded
    tokens computed when each group runs as one right-padded batch, plus a fixed cost per
    call. Exact dynamic programme over the (few) distinct lengths; ``overhead=0`` gives one
    group per length, a large ``overhead`` a single group."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cost of the first j lengths
        rows = 0
        for i in range(j - 1, -1, -1):  # last group = lengths[i..j-1]
            rows += counts[i]
            cost = best[i] + rows * lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out: list[tuple[int, int]] = []
    j = n
    while j > 0:
        out.append((lengths[cut[j]], lengths[j - 1]))
        j = cut[j]
    return out[::-1]


@dataclass
class TargetProblem:
    """The packed batch behind L_i: rewrite rows (one per request x template) and one KL row
    per request. Row tensors live on the model's device.

    ``site_rows``/``site_cols`` (n_rows,): where each row's subject ends; ``owner`` (n_rows,):
    the request of each row; ``tgt_*``: the positions predicting target tokens, their token
    ids, and the row each belongs to; ``kl_rows`` (n,): the KL row of each request.
    ``last_correct``: after each :meth:`losses` call, (rows, correct) of the target tokens it
    scored: each token's row and whether the token is the argmax there (a stop rule's input,
    e.g. ENCORE's most-probable early stopping).
    """

    lm: LoadedModel
    n: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    site_rows: torch.Tensor
    site_cols: torch.Tensor
    owner: torch.Tensor
    tgt_rows: torch.Tensor
    tgt_cols: torch.Tensor
    tgt_ids: torch.Tensor
    tgt_len: torch.Tensor
    n_templates: int
    kl_rows: torch.Tensor
    plain_rows: torch.Tensor
    init_kl_logp: torch.Tensor | None = None
    last_correct: tuple[torch.Tensor, torch.Tensor] | None = None
    prefix: dict[str, Any] | None = None
    start: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _active: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(cls, lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str],
              kl_prompt: str = "{} is a", target_space: bool = True) -> TargetProblem:
        """``target_space``: the target is tokenised after the prompt with the space
        :func:`harness.scoring.encode_pair` puts before it (every method); False tokenises
        ``target_new`` alone, without that space (NSE's released pre-pass does so)."""
        tok = lm.tokenizer
        seqs: list[list[int]] = []
        site_cols: list[int] = []
        owner: list[int] = []
        tgt_rows: list[int] = []
        tgt_cols: list[int] = []
        tgt_ids: list[int] = []
        tgt_len: list[int] = []
        kl_rows: list[int] = []
        plain_rows: list[int] = []
        for i, r in enumerate(requests):
            for t, ctx in enumerate(templates):
                site = subject_site(tok, r.prompt, r.subject, prefix=ctx)
                p_ids, t_ids = encode_pair(tok, site.text, r.target_new)
                if not target_space:
                    t_ids = tok(r.target_new, add_special_tokens=False)["input_ids"]
                row = len(seqs)
                if t == 0:
                    plain_rows.append(row)
                seqs.append(p_ids + t_ids[:-1])
                site_cols.append(site.position)
                owner.append(i)
                tgt_rows += [row] * len(t_ids)
                tgt_cols += range(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))
                tgt_ids += t_ids
                tgt_len.append(len(t_ids))
            site = subject_site(tok, kl_prompt, r.subject)
            kl_rows.append(len(seqs))
            seqs.append(tok(site.text, add_special_tokens=True)["input_ids"])
            site_cols.append(site.position)
            owner.append(i)
        width = max(map(len, seqs))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        dev = lm.device

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, device=dev, dtype=torch.long)

        return cls(lm=lm, n=len(requests), input_ids=ids.to(dev), attention_mask=mask.to(dev),
                   site_rows=torch.arange(len(seqs), device=dev), site_cols=t(site_cols),
                   owner=t(owner), tgt_rows=t(tgt_rows), tgt_cols=t(tgt_cols),
                   tgt_ids=t(tgt_ids), tgt_len=t(tgt_len), n_templates=len(templates),
                   kl_rows=t(kl_rows), plain_rows=t(plain_rows))

    @torch.no_grad()
    def enable_prefix_cache(self, buckets: bool | None = None) -> None:
        """Run every row's tokens before its subject site once, and keep their key/value cache.

        Nothing before the site depends on an edit made at the site (causal attention), so
        each later step only runs the suffix (site onwards: a few tokens instead of the whole
        prompt). Prefixes are left-padded and suffixes right-padded; position ids are the
        unpadded ones, so results equal the full forward (tested). With ``buckets`` (default:
        on CPU, where compute is proportional to padded tokens; off on accelerators, where
        one larger call beats several small ones) rows are grouped by suffix length
        (:func:`group_lengths`) and each group runs as its own forward, so little padding is
        computed.
        """
        q = self.site_cols
        if int(q.max()) == 0:
            return
        lengths = self.attention_mask.sum(1)
        suffix = lengths - q
        if buckets is None:
            buckets = self.lm.device.type == "cpu"
        if buckets:
            values, counts = torch.unique(suffix, return_counts=True)
            bounds = group_lengths(values.tolist(), counts.tolist(), BUCKET_OVERHEAD_TOKENS)
            groups = [torch.nonzero((suffix >= lo) & (suffix <= hi))[:, 0] for lo, hi in bounds]
        else:
            groups = [torch.arange(len(q), device=q.device)]
        self.prefix = {"chunks": [self._chunk(rows) for rows in groups]}

    def _chunk(self, rows: torch.Tensor) -> dict[str, Any]:
        """Prefix cache and suffix tensors for ``rows`` (global row indices)."""
        from transformers import DynamicCache

        ids_all, mask_all = self.input_ids[rows], self.attention_mask[rows]
        q, lengths = self.site_cols[rows], mask_all.sum(1)
        width = max(int(q.max()), 1)
        dev = ids_all.device
        ar = torch.arange(width, device=dev)
        # left-padded prefix: row r's tokens [0, q_r) sit at columns [width - q_r, width)
        src = (ar[None, :] - (width - q)[:, None])
        pmask = (src >= 0).long()
        pids = torch.where(pmask.bool(), ids_all.gather(1, src.clamp_min(0)), ids_all[:, :1])
        cache = DynamicCache()
        self.lm.model.base_model(input_ids=pids, attention_mask=pmask,
                                 position_ids=src.clamp_min(0), use_cache=True,
                                 **_cache_kwarg(self.lm, cache))
        s_width = int((lengths - q).max())
        sidx = q[:, None] + torch.arange(s_width, device=dev)[None, :]
        smask = (sidx < lengths[:, None]).long()
        sids = torch.where(smask.bool(), ids_all.gather(1, sidx.clamp_max(ids_all.shape[1] - 1)),
                           ids_all[:, :1])
        return {"rows": rows, "cache": cache, "mask": torch.cat([pmask, smask], dim=1),
                "ids": sids, "positions": sidx}

    def active_sites(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local rows, cols, global rows) of the subject sites in the tensors that hooks see
        during the forward now running (one bucket of rows with the prefix cache: the site is
        column 0 of every suffix)."""
        rows = self._active
        if self.prefix is None:
            return rows, self.site_cols[rows], rows
        return torch.arange(len(rows), device=rows.device), torch.zeros_like(rows), rows

    def _logits(self, rows: torch.Tensor, cols: torch.Tensor, full: bool = False
                ) -> torch.Tensor:
        """Float32 logits (len(rows), vocab) at positions ``(rows, cols)`` of the full rows."""
        if self.prefix is None:
            self._active = torch.arange(self.input_ids.shape[0], device=rows.device)
            return logits_at(self.lm, self.input_ids, self.attention_mask, rows, cols)
        order, parts = [], []
        for chunk in self.prefix["chunks"]:
            local = torch.full((self.input_ids.shape[0],), -1, device=rows.device,
                               dtype=torch.long)
            local[chunk["rows"]] = torch.arange(len(chunk["rows"]), device=rows.device)
            want = torch.nonzero(local[rows] >= 0)[:, 0]
            if len(want) == 0:
                continue
            r = rows[want]
            # run only the chunk rows asked for (a frozen request's rows are left out)
            needed = torch.zeros(len(chunk["rows"]), dtype=torch.bool, device=rows.device)
            needed[local[r]] = True
            sel = torch.nonzero(needed)[:, 0]
            cache = copy.deepcopy(chunk["cache"])  # the forward appends the suffix to its copy
            part = {k: chunk[k] for k in ("mask", "positions", "ids", "embeds") if k in chunk}
            if len(sel) < len(chunk["rows"]):
                cache.batch_select_indices(sel)
                part = {k: v[sel] for k, v in part.items()}
            pos_in_sel = torch.cumsum(needed.long(), 0) - 1  # chunk-local -> row of `part`
            self._active = chunk["rows"][sel]
            kwargs = {"attention_mask": part["mask"], "position_ids": part["positions"],
                      "use_cache": True, **_cache_kwarg(self.lm, cache)}
            if "embeds" in part and not full:
                with _upper_layers(self.lm, self.start["layer"]):
                    hidden = self.lm.model.base_model(inputs_embeds=part["embeds"],
                                                      **kwargs).last_hidden_state
            else:
                hidden = self.lm.model.base_model(input_ids=part["ids"],
                                                  **kwargs).last_hidden_state
            parts.append(hidden[pos_in_sel[local[r]], cols[want] - self.site_cols[r]])
            order.append(want)
        out = torch.empty(len(rows), parts[0].shape[-1], dtype=parts[0].dtype,
                          device=parts[0].device)
        out = out.index_copy(0, torch.cat(order), torch.cat(parts))
        return unembed(self.lm, out)

    @torch.no_grad()
    def skip_lower_layers(self, layer: int) -> bool:
        """Start every later forward at decoder ``layer``: the suffix's input to that layer is
        computed once here and fed as ``inputs_embeds`` to a model whose layer list is cut
        to ``layer..L-1`` (the prefix cache still holds every layer's keys and values).
        Exact as long as nothing edits a layer below ``layer`` (hooks there would not run),
        so callers pass the lowest layer they hook. Checked once against the full forward on
        the unedited model; returns False (and keeps the full forward) where the shortcut
        does not reproduce it, e.g. an architecture that rescales ``inputs_embeds``."""
        self.start = None
        lm = self.lm
        if self.prefix is None:
            return False
        for chunk in self.prefix["chunks"]:
            chunk.pop("embeds", None)
        if layer <= 0 or _layer_list(lm) is None:
            return False
        below = lm.spec.layer(layer - 1)
        for chunk in self.prefix["chunks"]:
            with capture_outputs(lm.model, [below]) as outs, stop_after(lm.model, below):
                lm.model.base_model(input_ids=chunk["ids"], attention_mask=chunk["mask"],
                                    position_ids=chunk["positions"], use_cache=True,
                                    **_cache_kwarg(lm, copy.deepcopy(chunk["cache"])))
            embeds = outs[below][0]
            if lm.spec.position_embed:  # the model adds position embeddings to inputs_embeds
                embeds = embeds - lm.module(lm.spec.position_embed)(chunk["positions"])
            chunk["embeds"] = embeds
        self.start = {"layer": layer}
        rows = torch.cat([self.tgt_rows, self.kl_rows])
        cols = torch.cat([self.tgt_cols, self.site_cols[self.kl_rows]])
        ref, fast = self._logits(rows, cols, full=True), self._logits(rows, cols)
        tol = 1e-3 if ref.dtype in (torch.float32, torch.float64) else 3e-2
        if not torch.allclose(fast.float(), ref.float(), rtol=tol,
                              atol=tol * float(ref.abs().max())):
            self.start = None
            for chunk in self.prefix["chunks"]:
                chunk.pop("embeds", None)
        return self.start is not None

    def losses(self, hooks: Callable[[], AbstractContextManager[Any]],
               active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per request (n,): NLL_i and KL_i of the model run inside ``hooks()``.

        ``active`` (n,) bool: only these requests' rows are run (rows never interact, so
        their values are unchanged); the others get 0. The first call (expected with no edit
        and every request active) records the reference KL distribution.
        """
        if active is not None and bool(active.all()):
            active = None
        tgt_keep = kl_keep = None
        tgt_rows, tgt_cols, tgt_ids, kl_rows = (self.tgt_rows, self.tgt_cols, self.tgt_ids,
                                                self.kl_rows)
        if active is not None:
            if self.init_kl_logp is None:
                raise ValueError("the first losses() call must run every request")
            tgt_keep = active[self.owner[tgt_rows]]
            kl_keep = active
            tgt_rows, tgt_cols, tgt_ids = tgt_rows[tgt_keep], tgt_cols[tgt_keep], tgt_ids[tgt_keep]
            kl_rows = kl_rows[kl_keep]
        rows = torch.cat([tgt_rows, kl_rows])
        cols = torch.cat([tgt_cols, self.site_cols[kl_rows]])
        with hooks():
            logits = self._logits(rows, cols)
        logp = torch.log_softmax(logits, dim=-1)
        n_t = len(tgt_rows)
        tok_lp = logp[:n_t].gather(1, tgt_ids[:, None])[:, 0]
        self.last_correct = (tgt_rows, (logp[:n_t].detach().argmax(-1) == tgt_ids))
        n_rows = self.input_ids.shape[0]
        per_row = torch.zeros(n_rows, device=tok_lp.device, dtype=tok_lp.dtype)
        per_row = per_row.index_add(0, tgt_rows, -tok_lp)
        rewrite_rows = torch.unique(self.tgt_rows)
        per_row_mean = per_row[rewrite_rows] / self.tgt_len
        nll = per_row_mean.view(self.n, self.n_templates).mean(1)
        kl_logp = logp[n_t:]
        if self.init_kl_logp is None:
            self.init_kl_logp = kl_logp.detach()
        ref = self.init_kl_logp if kl_keep is None else self.init_kl_logp[kl_keep]
        kl_part = (kl_logp.exp() * (kl_logp - ref)).sum(-1)
        if kl_keep is None:
            return nll, kl_part
        kl = torch.zeros(self.n, device=kl_part.device, dtype=kl_part.dtype)
        return nll, kl.index_put((torch.nonzero(kl_keep)[:, 0],), kl_part)


def _layer_list(lm: LoadedModel) -> tuple[torch.nn.Module, str] | None:
    """(parent module, attribute) of the decoder layer ``ModuleList``, from the spec's layer
    template (``model.layers.{}`` -> the ``layers`` attribute of ``model``)."""
    path = lm.spec.layer_template.removesuffix(".{}")
    parent_name, _, attr = path.rpartition(".")
    parent = lm.module(parent_name) if parent_name else lm.model
    if not isinstance(getattr(parent, attr, None), torch.nn.ModuleList):
        return None
    return parent, attr


@contextmanager
def _upper_layers(lm: LoadedModel, layer: int) -> Iterator[None]:
    """Inside the block the model's decoder layer list is ``layers[layer:]``; each layer keeps
    its own index for the KV cache."""
    found = _layer_list(lm)
    assert found is not None
    parent, attr = found
    full = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList(list(full)[layer:]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def add_at_sites(problem: TargetProblem, layer_name: str, delta: torch.Tensor
                 ) -> Callable[[], AbstractContextManager[Any]]:
    """Hook factory: add ``delta[owner[row]]`` (n, d_model) to ``layer_name``'s output at each
    row's subject site."""
    owner = problem.owner

    def fn(y: torch.Tensor) -> torch.Tensor:
        rows, cols, glob = problem.active_sites()
        return y.index_put((rows, cols), y[rows, cols] + delta[owner[glob]].to(y.dtype))

    return lambda: edit_output(problem.lm.model, layer_name, fn)


@torch.inference_mode()
def site_states(lm: LoadedModel, problem: TargetProblem, layer: int,
                value_site: str = "residual") -> torch.Tensor:
    """(d_model, n) unedited value (:func:`methods.keys.value_module`) at each request's
    plain-prompt site."""
    from harness.nethook import capture_outputs, stop_after

    name = value_module(lm, layer, value_site)
    rows = problem.plain_rows
    with capture_outputs(lm.model, [name], clone=False) as outs, stop_after(lm.model, name):
        lm.model.base_model(input_ids=problem.input_ids[rows],
                            attention_mask=problem.attention_mask[rows], use_cache=False)
    return outs[name][0][torch.arange(len(rows), device=rows.device),
                         problem.site_cols[rows]].float().T.contiguous()


#: stop_rule(problem, active) -> (n,) bool: requests to stop now (before this iteration's
#: update), called after every loss evaluation with ``active`` (n,) the requests it ran
StopRule = Callable[[TargetProblem, torch.Tensor], torch.Tensor]


def compute_targets(lm: LoadedModel, requests: Sequence[EditRequest], layer: int,
                    hp: TargetHparams, templates: Sequence[str],
                    stop_rule: StopRule | None = None, target_space: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]], TargetProblem]:
    """Open-loop targets at decoder layer ``layer``.

    Returns Z0 (d_model, n) unedited states, V = Z0 + delta (d_model, n), per-request info
    (initial/final NLL, steps, |delta|, whether clamped) and the problem (reused by MetaKE).
    ``stop_rule`` (e.g. ENCORE's most-probable early stopping) stops requests in addition to
    the loss threshold ``stop_loss``, at the same point of the loop. ``target_space``:
    :meth:`TargetProblem.build`.
    """
    site = hp.value_site
    problem = TargetProblem.build(lm, requests, templates, hp.kl_prompt, target_space)
    z0 = site_states(lm, problem, layer, site)
    if hp.prefix_cache:
        problem.enable_prefix_cache()
        if hp.skip_lower_layers:
            problem.skip_lower_layers(layer)
    n, d = len(requests), z0.shape[0]
    delta = torch.zeros(n, d, device=lm.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * z0.norm(dim=0)
    z0_sq = z0.norm(dim=0) ** 2
    frozen = torch.zeros(n, dtype=torch.bool, device=lm.device)
    hooks = add_at_sites(problem, value_module(lm, layer, site), delta)
    legacy = hp.v_steps is not None
    n_iter = hp.v_steps if legacy else hp.v_num_grad_steps
    first_nll = torch.full((n,), float("nan"))
    last_nll = first_nll.clone()
    steps = torch.zeros(n, dtype=torch.long)
    with torch.enable_grad():
        for step in range(n_iter):
            nll, kl = problem.losses(hooks, active=None if step == 0 else ~frozen)
            loss = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm(dim=1) / z0_sq
            if step == 0:
                first_nll = nll.detach().cpu()
            last_nll = torch.where(frozen.cpu(), last_nll, nll.detach().cpu())
            if stop_rule is not None:
                frozen |= stop_rule(problem, ~frozen)
            frozen |= loss.detach() < hp.stop_loss
            if bool(frozen.all()):
                break
            if not legacy and step == n_iter - 1:
                break  # the published loop's last iteration only evaluates
            steps += (~frozen).long().cpu()
            kept = delta.detach().clone()
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                delta[frozen] = kept[frozen]
                norms = delta.norm(dim=1)
                scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
                delta.mul_(scale[:, None])
    clamped = (delta.detach().norm(dim=1) >= max_norm * (1 - 1e-4)).cpu()
    V = z0 + delta.detach().T
    info = [{"target_nll_init": float(first_nll[i]), "target_nll_final": float(last_nll[i]),
             "target_steps": int(steps[i]), "delta_norm": float(delta[i].detach().norm()),
             "delta_clamped": bool(clamped[i])} for i in range(n)]
    return z0, V, info, problem
