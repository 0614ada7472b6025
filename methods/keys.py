"""Where locate-then-edit methods read and write: prompt sites, keys, hidden states.

* A *site* is a prompt string and the index of its subject's last token (ROME's
  "subject_last" lookup), the token whose MLP key is edited.
* Context templates (ROME/MEMIT): the rewrite prompt alone plus short model-generated prefixes
  ("The ... . {}"), so that keys and targets do not depend on one exact wording.
* ``keys_and_states`` runs ONE forward pass over all sites and returns, per requested layer,
  the input of the rewrite module at each site (the key k, d_in) and the output of the decoder
  layer at each site (the hidden state h, d_model); the pass stops after the deepest layer
  needed.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
                    state_layers: Sequence[int] = ()
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward over ``sites``: keys (n_sites, d_in) at each of ``key_layers`` and values
    (n_sites, d_model; ``lm.spec.value``: layer outputs, or the rewrite module's output where
    a norm follows it) at each of ``state_layers``, in float32."""
    ids, mask = _right_pad(lm.tokenizer, [s.text for s in sites], lm.device)
    rows = torch.arange(len(sites), device=lm.device)
    cols = torch.tensor([s.position for s in sites], device=lm.device)
    width = int(cols.max()) + 1  # tokens after every site cannot change it (causal): cut them
    ids, mask = ids[:, :width], mask[:, :width]
    key_names = {layer: lm.spec.rewrite(layer) for layer in key_layers}
    state_names = {layer: lm.spec.value(layer) for layer in state_layers}
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
                  layers: Sequence[int], state_layers: Sequence[int] = ()
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys K (d_in, n_requests) per layer, averaged over the context templates (ROME/MEMIT
    ``compute_ks``), and hidden states (d_model, n_requests) per state layer read at the plain
    rewrite prompt (template ``""``), both from one forward pass."""
    sites = request_sites(lm, requests, templates)
    keys, states = keys_and_states(lm, sites, layers, state_layers)
    t = len(templates)
    K = {layer: k.view(len(requests), t, -1).mean(1).T.contiguous() for layer, k in keys.items()}
    Z = {layer: h.view(len(requests), t, -1)[:, 0].T.contiguous() for layer, h in states.items()}
    return K, Z
