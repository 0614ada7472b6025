"""Batched, padded scoring must equal one-sequence-at-a-time scoring."""

import torch

from harness.scoring import encode_pair, mean_nll, score_targets


def _single(lm, prompt, target):
    p, t = encode_pair(lm.tokenizer, prompt, target)
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(p) - 1, len(p) - 1 + len(t))
    return logp[pos, torch.tensor(t)]


PAIRS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("Danielle Darrieux speaks", "French"),
    ("A", "very long multi token target with several words"),
    ("The mother tongue of Danielle Darrieux is", "English"),
]


def test_batched_equals_unpadded(tiny_lm):
    prompts, targets = zip(*PAIRS, strict=True)
    scores = score_targets(tiny_lm, prompts, targets, batch_size=3)
    for (p, t), lp in zip(PAIRS, scores.logprobs, strict=True):
        ref = _single(tiny_lm, p, t)
        assert lp.shape == ref.shape
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    assert len(scores.logprobs[2]) > 3  # multi-token target


def test_batch_size_does_not_change_scores(tiny_lm):
    prompts, targets = zip(*PAIRS, strict=True)
    a = score_targets(tiny_lm, prompts, targets, batch_size=1)
    b = score_targets(tiny_lm, prompts, targets, batch_size=4)
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_mean_nll_matches_scores_and_has_grad(tiny_lm):
    prompts, targets = zip(*PAIRS, strict=True)
    scores = score_targets(tiny_lm, prompts, targets)
    w = tiny_lm.rewrite_weight(1)
    w.requires_grad_(True)
    try:
        nll = mean_nll(tiny_lm, prompts, targets)
        nll.sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    finally:
        w.requires_grad_(False)
        w.grad = None
    torch.testing.assert_close(-nll.detach(), scores.mean_logprob(), atol=1e-4, rtol=0)


def test_target_space_convention(tiny_lm):
    tok = tiny_lm.tokenizer
    _, t1 = encode_pair(tok, "located in", "Paris")
    _, t2 = encode_pair(tok, "located in ", "Paris")
    assert t1 == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert t2 == tok("Paris", add_special_tokens=False)["input_ids"]
