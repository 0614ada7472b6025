import math

import pytest
import torch

from suites import metrics


def test_success_strict_and_ties_fail():
    first = torch.tensor([-1.0, -2.0, -3.0])
    second = torch.tensor([-2.0, -2.0, -1.0])
    assert metrics.success(first, second).tolist() == [1.0, 0.0, 0.0]


def test_magnitude_is_probability_gap():
    first = torch.log(torch.tensor([0.7, 0.1]))
    second = torch.log(torch.tensor([0.2, 0.4]))
    assert metrics.magnitude(first, second).tolist() == pytest.approx([0.5, -0.3], abs=1e-6)


def test_margin():
    assert metrics.margin(torch.tensor([-1.0]), torch.tensor([-3.5])).item() == 2.5


def test_mean_logprob_multitoken():
    per_token = [torch.tensor([-1.0, -3.0]), torch.tensor([-0.5])]
    assert metrics.mean_logprob(per_token).tolist() == [-2.0, -0.5]


def test_multitoken_mean_can_flip_the_sum_ordering():
    # new: 3 tokens each p=0.5 (sum -2.08, mean -0.69); true: 1 token p=0.3 (-1.20)
    new = [torch.log(torch.tensor([0.5, 0.5, 0.5]))]
    true = [torch.log(torch.tensor([0.3]))]
    s = metrics.success(metrics.mean_logprob(new), metrics.mean_logprob(true))
    assert s.item() == 1.0  # by the mean (ROME's definition); the summed NLL would say 0


def test_harmonic_mean():
    assert metrics.harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)
    assert metrics.harmonic_mean([0.0, 100.0]) == 0.0
    assert math.isnan(metrics.harmonic_mean([float("nan"), 1.0]))


def test_diagnostic_means_skip_missing_and_nonfinite():
    recs = [{"diagnostics": {"rho": 0.5, "z_error": float("nan")}},
            {"diagnostics": {"rho": 1.0, "z_error": 0.2}}, {"diagnostics": {}}, {}]
    assert metrics.diagnostic_means(recs) == {"mean_rho": 0.75, "mean_z_error": 0.2}
