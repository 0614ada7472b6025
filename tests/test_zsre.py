"""zsRE: loader validation, token-accuracy metrics, the evaluation on a tiny model, the
pre-edit reference pass through the runner."""

import json

import pytest
import torch

from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import DataError, UserError
from harness.runner import run
from harness.scoring import score_targets
from suites import get_suite, zsre

RECORD = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def _write(tmp_path, data, name="zsre.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


# --- pure metrics -----------------------------------------------------------------------------


def test_token_accuracy_multi_token():
    target = torch.tensor([5, 7, 9, 11])
    assert zsre.token_accuracy(torch.tensor([5, 7, 9, 11]), target) == 1.0
    assert zsre.token_accuracy(torch.tensor([5, 0, 9, 0]), target) == 0.5
    assert zsre.token_accuracy(torch.tensor([1, 7, 9, 11]), target) == 0.75
    assert zsre.all_tokens_correct(torch.tensor([1, 7, 9, 11]), target) == 0.0
    assert zsre.all_tokens_correct(target.clone(), target) == 1.0
    with pytest.raises(ValueError):
        zsre.token_accuracy(torch.tensor([1, 2]), target)
    with pytest.raises(ValueError):
        zsre.token_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_summarize_in_percent():
    recs = [{"efficacy_accuracy": 1.0, "paraphrase_accuracy": 0.5, "specificity_accuracy": 0.25,
             "specificity_unedited_agreement": None, "efficacy_success": 1.0,
             "paraphrase_success": 0.0, "efficacy_margin": 2.0},
            {"efficacy_accuracy": 0.5, "paraphrase_accuracy": 0.5, "specificity_accuracy": 0.75,
             "specificity_unedited_agreement": None, "efficacy_success": 0.0,
             "paraphrase_success": 0.0, "efficacy_margin": -1.0}]
    s = zsre.summarize(recs)
    assert s["efficacy_accuracy"] == 75.0 and s["specificity_accuracy"] == 50.0
    assert s["efficacy_margin"] == 0.5
    assert "specificity_unedited_agreement" not in s  # no reference: absent, not 0
    assert set(s) <= set(zsre.SUMMARY_FIELDS)


# --- loader -----------------------------------------------------------------------------------


def test_record_to_request(tmp_path):
    (req,) = zsre.load(_write(tmp_path, [RECORD]), target="alt")
    assert req.prompt == "What is the product made by {}?"
    assert req.rewrite_prompt == RECORD["src"]
    assert req.target_new == "unmanned aircraft" and req.target_true == "uniform"
    assert req.paraphrase_prompts == (RECORD["rephrase"],)
    assert req.neighborhood_prompts == (RECORD["loc"] + "?",)
    assert req.neighborhood_target == "Walter Sobchak"
    assert req.case_id == "0"


def test_target_option_picks_the_field(tmp_path):
    """answers0 (default; the ROME/MEMIT/AlphaEdit loader): target_new = answers[0], the MEND
    model's pred as the contrast; alt (EasyEdit): target_new = alt, target_true = answers[0]."""
    rec = dict(RECORD, pred="uniforms", answers=["uniform", "workwear"])
    (default,) = zsre.load(_write(tmp_path, [rec]))
    assert default.target_new == "uniform" and default.target_true == "uniforms"
    (alt,) = zsre.load(_write(tmp_path, [rec]), target="alt")
    assert alt.target_new == "unmanned aircraft" and alt.target_true == "uniform"
    for req in (default, alt):  # everything but the targets is the same
        assert req.paraphrase_prompts == (RECORD["rephrase"],)
        assert req.neighborhood_target == "Walter Sobchak"
    assert zsre.TARGETS[0] == "answers0"
    with pytest.raises(UserError, match="zsre target 'pred' is not one of answers0, alt"):
        zsre.load(_write(tmp_path, [rec]), target="pred")


def test_registered_and_shared_file_loads(shared_data):
    suite = get_suite("zsre")
    assert suite is zsre
    path = shared_data / "zsre" / "zsre-mend-1k.json"
    reqs = zsre.load(path, target="alt")
    assert len(reqs) == 998  # two records have an empty "alt" and are skipped
    assert "534" not in {r.case_id for r in reqs} and reqs[534].case_id == "535"
    assert all("{}" in r.prompt for r in reqs)
    assert sum(r.extra["target_new_equals_true"] for r in reqs) == 17
    reqs = zsre.load(path)  # answers0: every record is an edit towards its answer
    assert len(reqs) == 1000 and reqs[534].case_id == "534"
    assert sum(r.extra["target_new_equals_true"] for r in reqs) == 571  # pred == answers[0]
    raw = json.loads(path.read_text())
    assert all(r.target_new == raw[i]["answers"][0] for i, r in enumerate(reqs))


def test_empty_alt_skipped_or_rejected(tmp_path):
    path = _write(tmp_path, [RECORD, dict(RECORD, alt=""), RECORD])
    assert [r.case_id for r in zsre.load(path, target="alt")] == ["0", "2"]
    with pytest.raises(DataError) as err:
        zsre.load(path, skip_empty_alt=False, target="alt")
    assert err.value.index == 1 and err.value.field == "alt"
    assert [r.case_id for r in zsre.load(path)] == ["0", "1", "2"]  # answers0 needs no alt


@pytest.mark.parametrize(("change", "field"), [
    ({"src": None}, "src"),
    ({"subject": "Nobody"}, "src"),
    ({"alt": None}, "alt"),
    ({"alt": 3}, "alt"),
    ({"answers": []}, "answers"),
    ({"answers": "uniform"}, None),  # a bare string is accepted as one answer
    ({"answers": [""]}, "answers"),
    ({"answers": None}, "answers"),
    ({"rephrase": ""}, "rephrase"),
    ({"loc": None}, "loc"),
    ({"loc_ans": 5}, "loc_ans"),
])
def test_malformed_records_name_file_record_and_field(tmp_path, change, field):
    bad = dict(RECORD)
    for k, v in change.items():
        if v is None:
            del bad[k]
        else:
            bad[k] = v
    path = _write(tmp_path, [RECORD, bad])
    target = "alt" if field == "alt" else "answers0"  # alt is read only with target=alt
    if field is None:
        assert len(zsre.load(path)) == 2
        return
    with pytest.raises(DataError) as err:
        zsre.load(path, target=target)
    assert err.value.index == 1 and err.value.field == field
    assert str(path) in str(err.value) and "record 1" in str(err.value)


def test_braces_escaped(tmp_path):
    rec = dict(RECORD, src="In {set} terms, what is the product made by UniFirst?")
    (req,) = zsre.load(_write(tmp_path, [rec]))
    assert req.rewrite_prompt == rec["src"]


# --- evaluation on a tiny model ---------------------------------------------------------------


def _requests(tmp_path):
    recs = [RECORD, dict(RECORD, subject="Delta Serpentis",
                         src="What is the name of the constellation which Delta Serpentis "
                             "belongs?",
                         rephrase="Which constellation holds Delta Serpentis?", alt="Virgo",
                         answers=["Serpens"], loc="nq question: who wrote the raven",
                         loc_ans="Edgar Allan Poe")]
    return zsre.load(_write(tmp_path, recs), target="alt")  # multi-token targets


def test_evaluate_matches_teacher_forced_scoring(tmp_path, tiny_lm):
    reqs = _requests(tmp_path)
    ref = zsre.reference(tiny_lm, reqs, batch_size=2)
    recs = zsre.evaluate(tiny_lm, reqs, batch_size=3, reference=ref)
    eff = score_targets(tiny_lm, [r.rewrite_prompt for r in reqs], [r.target_new for r in reqs])
    loc = score_targets(tiny_lm, [r.neighborhood_prompts[0] for r in reqs],
                        [r.neighborhood_target for r in reqs])
    for rec, e, n in zip(recs, eff.correct, loc.correct, strict=True):
        assert len(e) > 1  # multi-token targets
        assert rec["efficacy_accuracy"] == pytest.approx(e.float().mean().item())
        assert rec["efficacy_success"] == float(e.all())
        assert rec["specificity_accuracy"] == pytest.approx(n.float().mean().item())
        assert rec["specificity_unedited_agreement"] == 1.0  # same model as the reference
        assert len(rec["logprobs"]["rewrite"]["new"]) == len(e)
        assert rec["efficacy_margin"] == pytest.approx(rec["logprob_new"] - rec["logprob_true"])
    no_ref = zsre.evaluate(tiny_lm, reqs)
    assert all(r["specificity_unedited_agreement"] is None for r in no_ref)


def test_agreement_drops_when_the_model_changes(tmp_path, tiny_lm):
    reqs = _requests(tmp_path)
    ref = zsre.reference(tiny_lm, reqs)
    w = tiny_lm.rewrite_weight(3)
    saved = w.clone()
    try:
        with torch.no_grad():
            w.mul_(-50.0)
        recs = zsre.evaluate(tiny_lm, reqs, reference=ref)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert min(r["specificity_unedited_agreement"] for r in recs) < 1.0
    with pytest.raises(ValueError, match="reference for case"):
        zsre.evaluate(tiny_lm, reqs, reference=ref[::-1])


def test_runner_computes_reference_before_edits(tmp_path, tiny_lm, shared_data):
    cfg = RunConfig(model="random:llama-tiny", method="noop", suite="zsre", n_edits=3,
                    batch_size=2, device="cpu", out_dir=str(tmp_path))
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    recs = rec_io.read_records(run_dir / rec_io.RECORDS)
    assert [r["case_id"] for r in recs] == ["0", "1", "2"]
    assert all(r["specificity_unedited_agreement"] == 1.0 for r in recs)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    assert manifest["summary"]["specificity_unedited_agreement"] == 100.0
    assert manifest["timings"]["reference_s"] > 0
    assert not (run_dir / "curve.jsonl").exists()  # no downstream, no eval_every


def test_runner_passes_and_records_the_target(tmp_path, tiny_lm, shared_data):
    out = {}
    for target in ("answers0", "alt"):
        cfg = RunConfig(model="random:llama-tiny", method="noop", suite="zsre", n_edits=2,
                        device="cpu", out_dir=str(tmp_path), zsre_target=target)
        run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
        manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
        assert manifest["config"]["zsre_target"] == target
        out[target] = [r["logprob_new"] for r in rec_io.read_records(run_dir / rec_io.RECORDS)]
    raw = json.loads((shared_data / "zsre" / "zsre-mend-1k.json").read_text())[:2]
    expect = score_targets(tiny_lm, [r["src"] for r in raw], [r["answers"][0] for r in raw])
    assert out["answers0"] == pytest.approx([float(lp.mean()) for lp in expect.logprobs])
    assert out["answers0"] != pytest.approx(out["alt"])
    with pytest.raises(UserError, match="--zsre-target must be one of answers0, alt"):
        RunConfig(suite="zsre", zsre_target="answers").validate()
