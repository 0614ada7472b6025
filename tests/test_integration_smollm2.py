"""Real model, real data: FT-L on 3 CounterFact cases must raise efficacy above unedited."""

import pytest

from harness.config import RunConfig
from harness.records import read_records
from harness.runner import run

pytestmark = pytest.mark.slow


def test_ft_raises_efficacy_on_real_cases(tmp_path, smollm2, shared_data):
    common = dict(model="smollm2-135m", suite="counterfact", n_edits=3, batch_size=1,
                  device="cpu", out_dir=str(tmp_path))
    base = run(RunConfig(method="noop", **common), lm=smollm2, log=lambda s: None)
    ft = run(RunConfig(method="ft", **common), lm=smollm2, log=lambda s: None)
    pre = read_records(base / "records.jsonl")
    post = read_records(ft / "records.jsonl")
    assert [r["case_id"] for r in pre] == [r["case_id"] for r in post]
    pre_es = sum(r["efficacy_success"] for r in pre) / 3
    post_es = sum(r["efficacy_success"] for r in post) / 3
    assert post_es > pre_es
    # the margin log p(new) - log p(true) rises on every case
    assert all(b["efficacy_margin"] > a["efficacy_margin"] for a, b in zip(pre, post, strict=True))
