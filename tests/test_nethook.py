"""harness.nethook on the tiny random Llama and on a toy module with tuple outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.nethook import (
    StopForward,
    capture_inputs,
    capture_outputs,
    edit_output,
    on_inputs,
    stop_after,
)

IDS = torch.tensor([[28120, 905, 314, 260, 3145, 30], [504, 1163, 281, 253, 1789, 30]])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class TupleNet(nn.Module):
    """``block`` returns ``(y, extra)`` like older transformer blocks; ``head`` reads ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y, extra = self.block(x)
        return self.head(y), extra


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x), torch.ones(1)


def test_capture_inputs_records_first_arg_per_forward(tiny_lm):
    model, name = tiny_lm.model, tiny_lm.spec.rewrite(1)
    with torch.no_grad(), capture_inputs(model, [name]) as ins, \
            capture_outputs(model, [name]) as outs:
        model(input_ids=IDS)
        model(input_ids=IDS[:1])
    assert [tuple(x.shape) for x in ins[name]] == [(2, 6, 128), (1, 6, 128)]
    # the recorded input is what the module maps to its recorded output
    w = tiny_lm.rewrite_weight(1)
    torch.testing.assert_close(ins[name][0] @ w.T, outs[name][0])
    torch.testing.assert_close(ins[name][1][0], ins[name][0][0], rtol=1e-5, atol=1e-6)
    assert _hook_count(model) == 0


def test_on_inputs_callback_and_unknown_module(tiny_lm):
    seen = []
    with torch.no_grad(), on_inputs(tiny_lm.model, {tiny_lm.spec.rewrite(0): seen.append}):
        tiny_lm.model(input_ids=IDS)
    assert len(seen) == 1 and seen[0].shape == (2, 6, 128)
    with pytest.raises(KeyError, match="no module named"), \
            capture_inputs(tiny_lm.model, ["model.layers.99.mlp"]):
        pass
    assert _hook_count(tiny_lm.model) == 0


def test_stop_after_ends_the_pass_and_keeps_earlier_inputs(tiny_lm):
    model = tiny_lm.model
    names = [tiny_lm.spec.rewrite(i) for i in range(4)]
    with torch.no_grad(), capture_inputs(model, names) as full:
        logits = model(input_ids=IDS).logits
    reached = False
    with torch.no_grad(), capture_inputs(model, names) as part, \
            capture_outputs(model, ["lm_head"]) as head:
        with stop_after(model, names[1]):
            model(input_ids=IDS)
            reached = True  # skipped: the pass stops inside the call
    assert not reached
    assert [len(part[n]) for n in names] == [1, 1, 0, 0]
    assert head["lm_head"] == []
    for n in names[:2]:
        torch.testing.assert_close(part[n][0], full[n][0])
    assert _hook_count(model) == 0
    with torch.no_grad():  # hook removed: the next forward runs to the end
        torch.testing.assert_close(model(input_ids=IDS).logits, logits)


def test_stop_forward_propagates_outside_stop_after(tiny_lm):
    model = tiny_lm.model

    def raiser(_m, _a, _o):
        raise StopForward("x")

    h = model.get_submodule(tiny_lm.spec.rewrite(0)).register_forward_hook(raiser)
    try:
        with pytest.raises(StopForward), torch.no_grad():
            model(input_ids=IDS)
    finally:
        h.remove()


def test_edit_output_replaces_and_restores(tiny_lm):
    model = tiny_lm.model
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        with edit_output(model, tiny_lm.spec.final_norm, torch.zeros_like):
            zeroed = model(input_ids=IDS).logits
        with edit_output(model, tiny_lm.spec.rewrite(2), lambda y: y):
            same = model(input_ids=IDS).logits
        after = model(input_ids=IDS).logits
    assert torch.count_nonzero(zeroed) == 0
    torch.testing.assert_close(same, ref)
    torch.testing.assert_close(after, ref)
    assert _hook_count(model) == 0


def test_edit_output_is_differentiable_and_checks_shape(tiny_lm):
    model = tiny_lm.model
    name = tiny_lm.spec.rewrite(1)
    delta = torch.zeros(64, requires_grad=True)

    def add_at_last(y):
        y = y.clone()
        y[:, -1] = y[:, -1] + delta
        return y

    with edit_output(model, name, add_at_last):
        loss = model(input_ids=IDS).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert delta.grad is not None and torch.count_nonzero(delta.grad) > 0
    with pytest.raises(ValueError, match="must return a tensor of shape"), \
            edit_output(model, name, lambda y: y[:, :1]), torch.no_grad():
        model(input_ids=IDS)
    assert _hook_count(model) == 0


def test_tuple_outputs():
    torch.manual_seed(0)
    net = TupleNet()
    x = torch.randn(4, 3)
    with capture_outputs(net, ["block"]) as outs, capture_inputs(net, ["block.lin"]) as ins:
        _, extra_ref = net(x)
    torch.testing.assert_close(outs["block"][0], net.block.lin(x))
    torch.testing.assert_close(ins["block.lin"][0], x)
    with edit_output(net, "block", lambda y: 2 * y):
        y2, extra2 = net(x)
    torch.testing.assert_close(y2, net.head(2 * net.block.lin(x)))
    torch.testing.assert_close(extra2, extra_ref)
    with stop_after(net, "block"):
        net(x)
    assert _hook_count(net) == 0
