"""Downstream lm-eval tasks on the in-memory model, the CLI flags, and the sequential run's
checkpoint curve (downstream + probe set)."""

import json

import pytest
import torch

from harness import records as rec_io
from harness.cli import build_parser, config_from_args, main
from harness.config import RunConfig
from harness.errors import UserError
from harness.runner import CURVE, PROBE_SIZE, run
from suites import downstream

# --- task files -------------------------------------------------------------------------------


def test_every_local_task_has_a_yaml_and_renders(tmp_path, shared_data):
    out = downstream.render_task_dir(shared_data, tmp_path / "tasks", tmp_path / "cache")
    for task, rel in downstream.LOCAL_TASKS.items():
        text = (out / f"keh_{task}.yaml").read_text()
        assert "@KEH_" not in text
        assert f"task: keh_{task}" in text
        assert str((shared_data / rel).resolve()) in text
        assert str(tmp_path / "cache") in text
    assert (out / "utils.py").exists()


def test_task_names_and_checks(tmp_path, shared_data):
    assert downstream.parse_tasks(" sst2, mrpc,,sst2 ") == ["sst2", "mrpc"]
    assert downstream.lm_eval_name("sst2") == "keh_sst2"
    assert downstream.lm_eval_name("hellaswag") == "hellaswag"
    downstream.check_tasks(["sst2", "mmlu"], shared_data, num_fewshot=10)
    with pytest.raises(UserError, match="reserves only 10"):
        downstream.check_tasks(["sst2"], shared_data, num_fewshot=11)
    with pytest.raises(UserError, match=r"needs .*glue/rte\.jsonl"):
        downstream.check_tasks(["rte"], tmp_path, num_fewshot=0)
    with pytest.raises(UserError, match="not one of keh's offline tasks"):
        downstream.check_tasks(["hellaswag"], shared_data, num_fewshot=0)  # offline in tests


def test_accuracy_stderr():
    assert downstream.accuracy_stderr(0.5, 5) == pytest.approx(0.25)
    assert downstream.accuracy_stderr(1.0, 1) is None


# --- lm-eval on the in-memory model -----------------------------------------------------------


def _loglikelihoods(results, task):
    return torch.tensor([[r[0][0] for r in s["resps"]] for s in results["samples"][task]])


def test_lm_eval_scores_the_in_memory_model(tiny_lm, shared_data):
    tasks = ["sst2", "nli"]
    rng = torch.random.get_rng_state()
    before = downstream.run_lm_eval(tiny_lm, tasks, shared_data, limit=6, batch_size=8,
                                    log_samples=True)
    assert torch.equal(rng, torch.random.get_rng_state())  # the run's RNG is left alone
    scores = downstream.extract_scores(before, tasks)
    for t in tasks:
        assert scores[t]["n"] == 6 and 0.0 <= scores[t]["acc"] <= 1.0
    # the first 10 records are the few-shot pool: evaluation starts at record 10
    first = json.loads((shared_data / "glue" / "sst2.jsonl").read_text().splitlines()[10])
    assert before["samples"]["keh_sst2"][0]["doc"] == first
    # the nli labels are strings; the target index must follow them
    for s in before["samples"]["keh_nli"]:
        assert s["target"] == (0 if s["doc"]["label"] == "entailment" else 1)

    saved = [tiny_lm.rewrite_weight(i).clone() for i in range(tiny_lm.n_layers)]
    try:
        with torch.no_grad():
            for i in range(tiny_lm.n_layers):
                tiny_lm.rewrite_weight(i).zero_()
        after = downstream.run_lm_eval(tiny_lm, ["sst2"], shared_data, limit=6, batch_size=8,
                                       log_samples=True)
    finally:
        with torch.no_grad():
            for i, w in enumerate(saved):
                tiny_lm.rewrite_weight(i).copy_(w)
    ll_before = _loglikelihoods(before, "keh_sst2")
    ll_after = _loglikelihoods(after, "keh_sst2")
    assert ll_before.shape == ll_after.shape == (6, 2)
    assert (ll_before - ll_after).abs().max() > 1e-3


# --- CLI and the run loop ---------------------------------------------------------------------


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(
        ["run", "--downstream", "sst2,mrpc", "--downstream-limit", "50",
         "--downstream-fewshot", "3", "--generation-tokens", "20"])
    cfg = config_from_args(args)
    assert cfg.downstream == ["sst2", "mrpc"]
    assert (cfg.downstream_limit, cfg.downstream_fewshot, cfg.generation_tokens) == (50, 3, 20)


@pytest.mark.parametrize(("args", "needle"), [
    (["--generation-tokens", "-1"], "--generation-tokens must be >= 0"),
    (["--downstream-limit", "-5"], "--downstream-limit must be >= 0"),
    (["--downstream", "nosuchtask"], "not one of keh's offline tasks"),
    (["--downstream", "sst2", "--downstream-fewshot", "12"], "reserves only 10"),
    (["--suite", "zsre", "--generation-tokens", "5"], "suite 'zsre' has no generation"),
    (["--eval-every", "2"], "--eval-every 2 needs --sequential"),
])
def test_bad_flags(tmp_path, capsys, shared_data, monkeypatch, args, needle):
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    code = main(["run", "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("keh: error:") and needle in err[-1]
    assert not (tmp_path / "runs").exists()


def _cfg(tmp_path, **kw):
    base = dict(model="random:llama-tiny", method="noop", suite="zsre", n_edits=4,
                batch_size=1, device="cpu", out_dir=str(tmp_path), sequential=True)
    base.update(kw)
    return RunConfig(**base)


def test_sequential_run_writes_curve_with_downstream_and_probe(tmp_path, tiny_lm, shared_data):
    cfg = _cfg(tmp_path, eval_every=2, downstream=["sst2"], downstream_limit=4,
               data_dir=str(shared_data))
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    curve = rec_io.read_records(run_dir / CURVE)
    assert [c["n_edits_so_far"] for c in curve] == [0, 2, 4]
    assert [c["batch"] for c in curve] == [0, 2, 4]
    assert [c["probe_edited"] for c in curve] == [0, 2, 4]
    assert curve[0]["downstream_cache"].endswith(".json")  # unedited scores: cached by key
    assert all("downstream_cache" not in c for c in curve[1:])
    for c in curve:
        assert c["downstream"]["sst2"]["n"] == 4
        assert c["probe_size"] == min(PROBE_SIZE, 4)
        assert c["probe"]["specificity_unedited_agreement"] == 100.0  # noop: no drift
    timings = json.loads((run_dir / rec_io.MANIFEST).read_text())["timings"]
    assert timings["downstream_examples"] == 12 and timings["downstream_examples_per_s"] > 0
    assert timings["eval_cases_per_s"] > 0


def test_probe_curve_tracks_edits_without_downstream(tmp_path, tiny_lm, shared_data):
    cfg = _cfg(tmp_path, suite="counterfact", method="ft", eval_every=1, n_edits=2,
               hparams_overrides={"layers": [1], "steps": 3, "norm_constraint": 0.5,
                                  "lr": 5e-2})
    before = tiny_lm.rewrite_weight(1).clone()
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    assert torch.equal(before, tiny_lm.rewrite_weight(1))  # restored after the run
    curve = rec_io.read_records(run_dir / CURVE)
    assert [c["n_edits_so_far"] for c in curve] == [0, 1, 2]
    assert all("downstream" not in c for c in curve)
    margins = [c["probe"]["efficacy_margin"] for c in curve]
    assert margins[0] != margins[-1]  # the edits moved the probe cases


def test_batch_mode_downstream_before_and_after(tmp_path, tiny_lm, shared_data):
    cfg = _cfg(tmp_path, sequential=False, n_edits=2, downstream=["cola"],
               downstream_limit=3, data_dir=str(shared_data))
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    curve = rec_io.read_records(run_dir / CURVE)
    assert [(c["n_edits_so_far"], c["edits_in_model"]) for c in curve] == [(0, 0), (2, 1)]
    assert all("probe" not in c for c in curve)


def test_unedited_scores_are_measured_once_per_key(tmp_path, tiny_lm, shared_data):
    cache = tmp_path / "cache"
    a, pa = downstream.evaluate_unedited(tiny_lm, ["sst2"], shared_data, cache, limit=4)
    stored = json.loads(pa.read_text())
    assert stored["scores"] == a and stored["key"]["limit"] == 4
    assert stored["key"]["model_sha256"] == tiny_lm.sha256
    # the second call reads the file: a planted value (with its content hash) comes back
    stored["scores"]["sst2"]["acc"] = 0.123
    downstream.write_cache(pa, stored["key"], stored["scores"])
    b, pb = downstream.evaluate_unedited(tiny_lm, ["sst2"], shared_data, cache, limit=4)
    assert pb == pa and b["sst2"]["acc"] == 0.123
    # another limit is another key, measured afresh
    c, pc = downstream.evaluate_unedited(tiny_lm, ["sst2"], shared_data, cache, limit=5)
    assert pc != pa and c["sst2"]["n"] == 5
    # a damaged file is measured again
    pa.write_text("{")
    with pytest.warns(UserWarning, match="damaged downstream cache file"):
        d, _ = downstream.evaluate_unedited(tiny_lm, ["sst2"], shared_data, cache, limit=4)
    assert d == a
    # built-in lm-eval tasks (data fetched online, may change) are never cached
    assert downstream.unedited_cache_key(tiny_lm, ["hellaswag"], shared_data, 4, 0, 8) is None
