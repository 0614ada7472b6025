"""Where locate-then-edit methods read and write: prompt sites, keys, hidden states.

* A *site* is a prompt string and the index of its subject's last token (ROME's
  "subject_last" lookup), the token whose MLP key is edited.
* Context templates (ROME/MEMIT): the rewrite prompt alone plus short model-generated prefixes
  ("The ... . {}"), so that keys and targets do not depend on one exact wording. Here a
  template is its prefix string (``""`` for the plain prompt): the original code's template
  ``"X. {}"`` is the prefix ``"X. "``. :func:`original_context_templates` generates them as the
  published code does, :func:`parse_template_texts` takes given ones, :func:`context_templates`
  is the tuned preset's variant (kept for the ``tuned`` preset).
* Key averaging over templates (:func:`average_keys`): ``original`` = MEMIT/AlphaEdit's
  ``compute_ks`` (half the plain prompt's key, half the mean of the prefixed ones),
  ``uniform`` = the mean over all templates (ROME's ``compute_u``).
* ``keys_and_states`` runs ONE forward pass over all sites and returns, per requested layer,
  the input of the rewrite module at each site (the key k, d_in) and the output of the decoder
  layer at each site (the hidden state h, d_model); the pass stops after the deepest layer
  needed.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from harness.nethook import capture_inputs, capture_outputs, stop_after
from methods.base import EditRequest


@dataclass(frozen=True)
class Site:
    """``text``: the full prompt; ``position``: index of the subject's last token in it."""

    text: str
    position: int


def split_template(template: str) -> tuple[str, str]:
    """(text before ``{}``, text after) with ``{{``/``}}`` unescaped."""
    parts = list(string.Formatter().parse(template))
    before, after, seen = "", "", False
    for literal, field_name, _, _ in parts:
        if seen:
            after += literal
            continue
        before += literal
        if field_name is not None:
            if field_name != "":
                raise ValueError(f"template {template!r} has a named field {{{field_name}}}")
            seen = True
    if not seen:
        raise ValueError(f"template {template!r} has no '{{}}' for the subject")
    return before, after


def subject_site(tok, template: str, subject: str, prefix: str = "") -> Site:
    """The site of ``subject``'s last token in ``prefix + template.format(subject)``."""
    before, after = split_template(template)
    head = prefix + before + subject
    position = len(tok(head, add_special_tokens=True)["input_ids"]) - 1
    return Site(text=head + after, position=position)


def context_templates(lm: LoadedModel, n: int = 5, length: int = 10,
                      seed: int = 0) -> list[str]:
    """ROME/MEMIT context prefixes: ``""`` plus ``n`` sampled continuations of short starters
    (top-k 5 sampling, ``length`` new tokens, seeded), each followed by ". ". Braces are
    removed so the prefixes can never act as format fields."""
    cache = lm.info.setdefault("_context_templates", {})
    key = (n, length, seed)
    if key in cache:
        return cache[key]
    out = [""]
    if n > 0:
        starters = ["The", "Therefore", "Because", "I", "You"]
        tok = lm.tokenizer
        prompts = [starters[i % len(starters)] for i in range(n)]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        try:
            old_side = tok.padding_side
            tok.padding_side = "left"
            enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
            tok.padding_side = old_side
            with torch.inference_mode():
                ids = lm.model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length,
                                        pad_token_id=tok.pad_token_id)
        finally:
            torch.random.set_rng_state(state)
        for row in ids:
            text = tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
            start = tok.decode(row[:enc["input_ids"].shape[1]], skip_special_tokens=True)
            ctx = (start.strip() + text).replace("{", " ").replace("}", " ")
            out.append(" ".join(ctx.split()) + ". ")
    cache[key] = out
    return out


STARTERS = ("The", "Therefore", "Because", "I", "You")
KEY_AVERAGING = ("original", "uniform")
VALUE_SITES = ("residual", "mlp")


def original_context_templates(lm: LoadedModel, schedule: Sequence[Sequence[int]],
                               seed: int = 0, braces: str = " ") -> list[str]:
    """Context prefixes generated as the published ROME/MEMIT code does.

    For each ``(length, n)`` of ``schedule`` every starter word of :data:`STARTERS` is
    continued ``n // 5`` times (starter-major order) by top-k 5 sampling from the full
    softmax, until the sequence holds ``length`` tokens *in total* (the tokenizer's special
    tokens and the starter included). Each row is decoded with its special tokens, NFKD
    normalised, ``"\n\n"`` -> ``" "``, ``"<|endoftext|>"`` removed, braces replaced by
    ``braces`` (MEMIT: a space, ROME: nothing), and ``". "`` appended. Returns ``[""]`` plus
    the prefixes. Sampling draws from a CPU generator seeded with ``seed`` (the original draws
    from torch's global RNG, so its prefixes are reproduced in distribution, not in value;
    pass the texts through ``context_template_texts`` for value parity).
    """
    cache = lm.info.setdefault("_context_templates", {})
    key = ("original", tuple(tuple(x) for x in schedule), seed, braces)
    if key in cache:
        return cache[key]
    tok = lm.tokenizer
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = [""]
    for length, n in schedule:
        rows = [list(tok(s)["input_ids"]) for s in STARTERS for _ in range(n // len(STARTERS))]
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_len.setdefault(len(r), []).append(i)
        for idx in by_len.values():  # rows of equal length grow together
            ids = torch.tensor([rows[i] for i in idx], device=lm.device)
            with torch.inference_mode():
                while ids.shape[1] < length:
                    logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1]
                    probs = torch.softmax(logits.float(), dim=-1)
                    top_p, top_i = torch.topk(probs, 5, dim=-1)
                    top_p = (top_p / top_p.sum(-1, keepdim=True)).cpu()
                    pick = torch.multinomial(top_p, 1, generator=gen)
                    ids = torch.cat([ids, top_i.cpu().gather(1, pick).to(ids.device)], dim=1)
            for i, row in zip(idx, ids.tolist(), strict=True):
                rows[i] = row
        for row in rows:
            text = unicodedata.normalize("NFKD", tok.decode(row))
            text = text.replace("\n\n", " ").replace("<|endoftext|>", "")
            out.append(text.replace("{", braces).replace("}", braces) + ". ")
    cache[key] = out
    return out


def parse_template_texts(texts: Sequence[str]) -> list[str]:
    """Prefixes from templates written as the original code holds them: ``"{}"`` first (the
    plain prompt), then ``"X. {}"`` strings; each has one ``{}``, at its end, and no other
    brace. Raises UserError otherwise."""
    field = "hparams: field 'context_template_texts'"
    if not texts or texts[0] != "{}":
        raise UserError(f"{field}: the first template must be '{{}}' (the plain prompt)")
    out = []
    for t in texts:
        if not t.endswith("{}") or "{" in t[:-2] or "}" in t[:-2]:
            raise UserError(f"{field}: {t!r} must end with '{{}}' and hold no other brace")
        out.append(t[:-2])
    return out


def average_keys(keys: torch.Tensor, mode: str) -> torch.Tensor:
    """Keys (n, t, d) per request and template (template 0 the plain prompt) -> (n, d).

    ``uniform``: mean over all t templates. ``original`` (MEMIT ``compute_ks``): the mean of
    the per-group means of the groups [plain] and [prefixed], i.e.
    0.5 k_plain + 0.5 mean(k_prefixed) (just k_plain when there is no prefix)."""
    if mode == "uniform" or keys.shape[1] == 1:
        return keys.mean(1)
    if mode == "original":
        return 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(1)
    raise UserError(f"hparams: field 'key_averaging' must be one of {KEY_AVERAGING}, got {mode!r}")


def value_module(lm: LoadedModel, layer: int, site: str = "residual") -> str:
    """Module whose output carries the edit's value at ``layer``: ``residual`` ->
    ``lm.spec.value`` (the decoder layer's output, or the MLP output where a norm follows it,
    Gemma 2/3); ``mlp`` -> the rewrite module's output (the MLP output; ROME's original
    ``mlp_module_tmp``)."""
    if site == "residual":
        return lm.spec.value(layer)
    if site == "mlp":
        return lm.spec.rewrite(layer)
    raise UserError(f"hparams: field 'value_site' must be one of {VALUE_SITES}, got {site!r}")


def _right_pad(tok, texts: Sequence[str], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(map(len, enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def keys_and_states(lm: LoadedModel, sites: Sequence[Site], key_layers: Sequence[int] = (),
                    state_layers: Sequence[int] = (), value_site: str = "residual"
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward over ``sites``: keys (n_sites, d_in) at each of ``key_layers`` and values
    (n_sites, d_model; :func:`value_module`) at each of ``state_layers``, in float32."""
    ids, mask = _right_pad(lm.tokenizer, [s.text for s in sites], lm.device)
    rows = torch.arange(len(sites), device=lm.device)
    cols = torch.tensor([s.position for s in sites], device=lm.device)
    width = int(cols.max()) + 1  # tokens after every site cannot change it (causal): cut them
    ids, mask = ids[:, :width], mask[:, :width]
    key_names = {layer: lm.spec.rewrite(layer) for layer in key_layers}
    state_names = {layer: value_module(lm, layer, value_site) for layer in state_layers}
    deepest = max([*key_layers, *state_layers])
    with capture_inputs(lm.model, key_names.values(), clone=False) as ins, \
            capture_outputs(lm.model, state_names.values(), clone=False) as outs:
        with stop_after(lm.model, lm.spec.layer(deepest)):
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    keys = {layer: ins[name][0][rows, cols].float() for layer, name in key_names.items()}
    states = {layer: outs[name][0][rows, cols].float() for layer, name in state_names.items()}
    return keys, states


def request_sites(lm: LoadedModel, requests: Sequence[EditRequest],
                  templates: Sequence[str]) -> list[Site]:
    """Sites of every (request, context template) pair, request-major: request i's sites are
    ``[i * len(templates), (i + 1) * len(templates))``; the first template is ``""``."""
    tok = lm.tokenizer
    return [subject_site(tok, r.prompt, r.subject, prefix=ctx)
            for r in requests for ctx in templates]


def averaged_keys(lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str],
                  layers: Sequence[int], state_layers: Sequence[int] = (),
                  averaging: str = "uniform", value_site: str = "residual",
                  plain: dict[int, torch.Tensor] | None = None
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys K (d_in, n_requests) per layer, averaged over the context templates
    (:func:`average_keys` with ``averaging``), and values (d_model, n_requests; at
    ``value_site``) per state layer read at the plain rewrite prompt (template ``""``), both
    from one forward pass. If ``plain`` is a dict, the plain prompt's keys (d_in, n_requests)
    per layer are stored in it too."""
    sites = request_sites(lm, requests, templates)
    keys, states = keys_and_states(lm, sites, layers, state_layers, value_site)
    t = len(templates)
    K = {layer: average_keys(k.view(len(requests), t, -1), averaging).T.contiguous()
         for layer, k in keys.items()}
    if plain is not None:
        for layer, k in keys.items():
            plain[layer] = k.view(len(requests), t, -1)[:, 0].T.contiguous()
    Z = {layer: h.view(len(requests), t, -1)[:, 0].T.contiguous() for layer, h in states.items()}
    return K, Z
