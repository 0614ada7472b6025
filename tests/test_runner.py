"""The run loop on a tiny random model and real CounterFact records."""

import json

import pytest

from harness import records as rec_io
from harness.config import RunConfig
from harness.runner import run


def _cfg(tmp_path, **kw):
    base = dict(model="random:llama-tiny", method="noop", suite="counterfact", n_edits=4,
                batch_size=2, device="cpu", out_dir=str(tmp_path))
    base.update(kw)
    return RunConfig(**base)


def test_noop_run_writes_manifest_and_records(tmp_path, tiny_lm, shared_data):
    run_dir = run(_cfg(tmp_path), lm=tiny_lm, log=lambda s: None)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    assert manifest["status"] == "complete"
    for key in ("config", "hparams", "seed", "versions", "git", "device", "timings",
                "peak_memory", "data", "model"):
        assert key in manifest, key
    assert len(manifest["data"]["sha256"]) == 64
    assert manifest["versions"]["torch"].startswith("2.")
    recs = rec_io.read_records(run_dir / rec_io.RECORDS)
    assert [r["case_id"] for r in recs] == manifest["data"]["case_ids"]
    assert [r["case_index"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert r["efficacy_success"] in (0.0, 1.0)
        assert set(r["logprobs"]) == {"rewrite", "paraphrase", "neighborhood",
                                      "neighborhood_plus"}
        # on by default: generation-based answers and the CounterFact+ NKL in every record
        assert {"gen_efficacy_em", "gen_paraphrase_f1", "neighborhood_plus_kl"} <= set(r)


def test_existing_run_dir_is_refused(tmp_path, tiny_lm, shared_data):
    from harness.errors import UserError

    run(_cfg(tmp_path, run_id="x"), lm=tiny_lm, log=lambda s: None)
    with pytest.raises(UserError, match="already holds a run"):
        run(_cfg(tmp_path, run_id="x"), lm=tiny_lm, log=lambda s: None)


def test_batch_mode_restores_weights(tmp_path, tiny_lm, shared_data):
    before = tiny_lm.rewrite_weight(1).clone()
    run(_cfg(tmp_path, method="ft", hparams_overrides={"layers": [1], "steps": 3,
                                                       "norm_constraint": 0.1, "lr": 1e-2}),
        lm=tiny_lm, log=lambda s: None)
    assert (tiny_lm.rewrite_weight(1) == before).all()


def test_same_seed_same_records(tmp_path, tiny_lm, shared_data):
    kw = dict(method="ft", hparams_overrides={"layers": [1], "steps": 3,
                                               "norm_constraint": 0.1, "lr": 1e-2})
    a = run(_cfg(tmp_path / "a", **kw), lm=tiny_lm, log=lambda s: None)
    b = run(_cfg(tmp_path / "b", **kw), lm=tiny_lm, log=lambda s: None)
    assert (a / rec_io.RECORDS).read_bytes() == (b / rec_io.RECORDS).read_bytes()
