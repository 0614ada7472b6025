"""Batched teacher-forced scoring of (prompt, target) pairs: the one hot path of evaluation.

For each pair the target is tokenised on its own, with a leading space (the CounterFact/ROME
convention: the object follows the prompt as a new word; no space is added when the prompt
already ends in whitespace) and without special tokens; the prompt is tokenised with the
tokenizer's own special tokens (a BOS where the tokenizer adds one, e.g. Gemma; none for
SmolLM2). Many pairs go through the model in one right-padded forward pass (right padding keeps
every real token's position id equal to the unpadded one), and the unembedding is applied only
at the positions that predict target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.models import LoadedModel


@dataclass
class TargetScores:
    """Per pair: ``logprobs[i]`` (n_i,) log p(t_j | prompt, t_<j), ``predicted[i]`` (n_i,) the
    argmax token at each predicting position, ``target_ids[i]`` (n_i,) the target tokens."""

    logprobs: list[torch.Tensor]
    predicted: list[torch.Tensor]
    target_ids: list[torch.Tensor]

    @property
    def correct(self) -> list[torch.Tensor]:
        """(n_i,) whether t_j is the argmax prediction (teacher-forced token accuracy)."""
        return [p == t for p, t in zip(self.predicted, self.target_ids, strict=True)]

    def mean_logprob(self) -> torch.Tensor:
        """(n_pairs,) mean per-token log-probability (the multi-token score of ROME)."""
        return torch.stack([lp.mean() for lp in self.logprobs])


def encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's special tokens) and of the target."""
    p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    spaced = target if (not prompt or prompt[-1].isspace() or target[:1].isspace()) \
        else " " + target
    t_ids = tok(spaced, add_special_tokens=False)["input_ids"]
    if not t_ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(p_ids), list(t_ids)


def logits_at(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits (len(rows), vocab) at positions (rows, cols), computed without full logits."""
    model = lm.model
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state
    return unembed(lm, hidden[rows, cols])


def unembed(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits (..., vocab) of final hidden states (..., d_model), with the model's
    final logit soft-capping where it has one (Gemma 2)."""
    logits = lm.model.get_output_embeddings()(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class Packed:
    """A right-padded batch of prompt+target sequences and where each target token sits.

    ``input_ids``/``attention_mask``: (B, T). ``rows``/``cols``: (N,) the (sequence, position)
    whose output predicts target token ``targets[n]``; ``lengths``: target length per pair.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    lengths: list[int]


def right_pad(tok, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T) on the CPU, every sequence flush left (right
    padding keeps each real token's position id)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


def pack(tok, pairs: Sequence[tuple[list[int], list[int]]], device: torch.device) -> Packed:
    """Right-pad encoded (prompt, target) pairs into one batch."""
    ids, mask = right_pad(tok, [p + t for p, t in pairs])
    rows: list[int] = []
    cols: list[int] = []
    tgt: list[int] = []
    for r, (p_ids, t_ids) in enumerate(pairs):
        # position len(p) - 1 + j predicts target token j
        rows += [r] * len(t_ids)
        cols += range(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))
        tgt += t_ids
    return Packed(ids.to(device), mask.to(device), torch.tensor(rows, device=device),
                  torch.tensor(cols, device=device), torch.tensor(tgt, device=device),
                  [len(t) for _, t in pairs])


def packed_logprobs(lm: LoadedModel, batch: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) log p of each target token and (N, V) float32 logits at the predicting positions.
    Differentiable when called with gradients enabled."""
    logits = logits_at(lm, batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
    lp = torch.log_softmax(logits, dim=-1).gather(1, batch.targets[:, None])[:, 0]
    return lp, logits


def mean_nll(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """(n_pairs,) differentiable mean per-token negative log-likelihood of each target."""
    tok = lm.tokenizer
    batch = pack(tok, [encode_pair(tok, p, t) for p, t in zip(prompts, targets, strict=True)],
                 lm.device)
    lp, _ = packed_logprobs(lm, batch)
    seg = torch.repeat_interleave(torch.arange(len(batch.lengths), device=lp.device),
                                  torch.tensor(batch.lengths, device=lp.device))
    sums = torch.zeros(len(batch.lengths), device=lp.device, dtype=lp.dtype).index_add(0, seg, lp)
    return -sums / torch.tensor(batch.lengths, device=lp.device, dtype=lp.dtype)


@torch.inference_mode()
def score_targets(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str],
                  batch_size: int = 32) -> TargetScores:
    """Teacher-forced log-probabilities of ``targets[i]`` after ``prompts[i]``.

    Pairs are sorted by length and run ``batch_size`` at a time. Returns per-token tensors on
    the CPU in float32.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    tok = lm.tokenizer
    enc = [encode_pair(tok, p, t) for p, t in zip(prompts, targets, strict=True)]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    out_lp: list[torch.Tensor] = [torch.empty(0)] * len(enc)
    out_pred: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = pack(tok, [enc[i] for i in idx], lm.device)
        lp, logits = packed_logprobs(lm, batch)
        lp, pred = lp.float().cpu(), logits.argmax(-1).cpu()
        offset = 0
        for i, n_t in zip(idx, batch.lengths, strict=True):
            out_lp[i] = lp[offset:offset + n_t]
            out_pred[i] = pred[offset:offset + n_t]
            offset += n_t
    target_ids = [torch.tensor(t, dtype=torch.long) for _, t in enc]
    return TargetScores(logprobs=out_lp, predicted=out_pred, target_ids=target_ids)


@torch.inference_mode()
def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 32
                        ) -> torch.Tensor:
    """(n_prompts, V) float32 log-softmax of the next token after each prompt, on the CPU.

    Prompts are tokenised as in :func:`encode_pair` (the tokenizer's special tokens), sorted by
    length and right-padded ``batch_size`` at a time; the unembedding is applied only at each
    prompt's last real token."""
    tok = lm.tokenizer
    enc = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    if any(not e for e in enc):
        raise ValueError("a prompt tokenises to nothing")
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = right_pad(tok, [enc[i] for i in idx])
        rows = torch.arange(len(idx), device=lm.device)
        cols = torch.tensor([len(enc[i]) - 1 for i in idx], device=lm.device)
        logits = logits_at(lm, ids.to(lm.device), mask.to(lm.device), rows, cols)
        lp = torch.log_softmax(logits, dim=-1).cpu()
        for r, i in enumerate(idx):
            out[i] = lp[r]
    return torch.stack(out) if out else torch.empty(0, 0)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(n,) KL(P || Q) = sum_v p_v (log p_v - log q_v) in nats, rows of log-probabilities
    ``logp``/``logq`` (n, V); computed in float64, tokens with p_v = 0 contribute 0."""
    logp, logq = logp.double(), logq.double()
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
