import json

import pytest

from harness.errors import DataError, UserError
from suites import counterfact
from suites.data import find_data_file

KNOWEDIT = {
    "case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
    "subject": "Danielle Darrieux", "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "Michel Rocard speaks",
    "locality_ground_truth": "French",
}
CANONICAL = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}, "relation_id": "P103"},
    "paraphrase_prompts": ["a. Danielle Darrieux speaks", "b. Darrieux's language is"],
    "neighborhood_prompts": ["Michel Rocard speaks", "Jean Gabin speaks", "X speaks"],
    "attribute_prompts": ["Y speaks"], "generation_prompts": ["Danielle Darrieux's mother"],
}


def _write(tmp_path, data, name="cf.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_knowedit_format(tmp_path):
    (req,) = counterfact.load(_write(tmp_path, [KNOWEDIT]))
    assert req.prompt == "The mother tongue of {} is"
    assert req.rewrite_prompt == KNOWEDIT["prompt"]
    assert req.case_id == "7" and req.target_true == "French"
    assert req.neighborhood_target == "French"
    assert req.paraphrase_prompts == ("Danielle Darrieux speaks",)


def test_canonical_format(tmp_path):
    (req,) = counterfact.load(_write(tmp_path, [CANONICAL]))
    assert req.prompt == "The mother tongue of {} is"
    assert req.target_new == "English" and req.target_true == "French"
    assert len(req.paraphrase_prompts) == 2 and len(req.neighborhood_prompts) == 3
    assert req.neighborhood_target == "French"


def test_braces_in_prompt_are_escaped(tmp_path):
    rec = dict(KNOWEDIT, prompt="In {set} notation Danielle Darrieux is")
    (req,) = counterfact.load(_write(tmp_path, [rec]))
    assert req.rewrite_prompt == rec["prompt"]


@pytest.mark.parametrize(("change", "field"), [
    ({"target_new": None}, "target_new"),
    ({"target_new": ""}, "target_new"),
    ({"subject": 5}, "subject"),
    ({"prompt": "The mother tongue of someone is"}, "prompt"),
    ({"target_new": "French"}, "target_new"),
])
def test_malformed_records_name_index_and_field(tmp_path, change, field):
    bad = dict(KNOWEDIT, case_id=8)
    for k, v in change.items():
        if v is None:
            del bad[k]
        else:
            bad[k] = v
    with pytest.raises(DataError) as err:
        counterfact.load(_write(tmp_path, [KNOWEDIT, bad]))
    assert err.value.index == 1 and err.value.field == field
    assert "record 1" in str(err.value) and field in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"), ('[{"case_id": 1, "prompt": ', "not valid JSON"), ("[]", "no records"),
    ('{"a": 1}', "missing"),
])
def test_bad_files(tmp_path, text, message):
    p = tmp_path / "cf.json"
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        counterfact.load(p)


def test_missing_file_names_path_and_url(tmp_path):
    with pytest.raises(UserError) as err:
        find_data_file("counterfact", counterfact.DEFAULT_FILES, counterfact.CANONICAL_URL,
                       directory=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and counterfact.CANONICAL_URL in msg


def test_shared_file_loads(shared_data):
    reqs = counterfact.load(shared_data / "counterfact" / "counterfact-edit.json")
    assert len(reqs) == 10000
    assert all(r.subject in r.rewrite_prompt for r in reqs[:100])
