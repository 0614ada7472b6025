"""Parity of the harness's faithful preset with the ORIGINAL ROME/MEMIT/AlphaEdit code.

The reference numbers in ``tests/fixtures/parity/`` were produced by the published code (the
AlphaEdit repository's ``rome/``, ``memit/``, ``AlphaEdit/``) through
``tools/parity/run_original.py`` (command, versions and every adaptation in the fixture's
README and ``fixture.json``). Both sides get the same context templates (generated once by the
original, passed here as ``context_template_texts``) and the same C0 (the harness's records-mode
statistics on the same WikiText-2 lines, injected into the original). Everything else is the
``faithful`` preset's defaults for SmolLM2.

Per case, on the first 10 CounterFact cases (ROME one edit at a time, MEMIT and AlphaEdit in
sequential batches, as the fixture's ``batches`` say): keys per edited layer, the target z and
the post-edit mean per-token log-probabilities to 10 x the spread measured between CPUs (the
constants below); and C0 against the original's own ``layer_stats`` on the same records. Two
small real changes (one target step fewer; MEMIT's keys averaged uniformly) must fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT

FIXTURE = Path(os.environ.get("KEH_PARITY_FIXTURE", ROOT / "tests" / "fixtures" / "parity"))
#: Tolerances: 10 x the largest error measured on either CPU the fixture has met (AVX2, the
#: fixture's README; AVX-512, AMD EPYC, 2026-12-07, ``pytest -s tests/test_parity.py``), rounded
#: up: keys 1.07e-5 (AlphaEdit, layer 8, AVX-512), z 1.35e-5 (ROME, AVX-512), post-edit log p
#: 5.55e-5 (ROME, AVX-512), pre-edit log p 1.88e-5 (AVX-512), C0 3.6e-7 (AVX2).
KEY_RTOL = 1.1e-4  # relative 2-norm error of every key vector
Z_RTOL = 1.4e-4  # relative 2-norm error of every target vector
LP_ATOL = 5.6e-4  # absolute error of every mean per-token log-probability
PRE_LP_ATOL = 1.9e-4  # unedited model: scoring alone
C0_RTOL = 3.6e-6  # relative error of trace, Frobenius norm, 8x8 block and sketch of C0

pytestmark = pytest.mark.slow


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    from safetensors.torch import load_file

    if not (FIXTURE / "fixture.json").is_file():
        pytest.fail(f"parity fixture missing in {FIXTURE}: produce it with the command in "
                    f"{FIXTURE / 'README.md'}")
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    meta["tensors"] = load_file(str(FIXTURE / "fixture.safetensors"))
    return meta


@pytest.fixture(scope="module")
def lm():
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def requests_(ref, shared_data):
    from suites.counterfact import load

    reqs = load(shared_data / "counterfact" / "counterfact-edit.json")
    by_id = {r.case_id: r for r in reqs}
    out = [by_id[str(c)] for c in ref["data"]["case_ids"]]
    for r, rec in zip(out, ref["data"]["records"], strict=True):  # same inputs as the original
        rw = rec["requested_rewrite"]
        assert (r.prompt, r.subject, r.target_new, r.target_true) == (
            rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"])
        assert list(r.paraphrase_prompts) == rec["paraphrase_prompts"]
        assert list(r.neighborhood_prompts) == rec["neighborhood_prompts"]
    return out


def stats_overrides(ref, shared_data) -> dict[str, Any]:
    c0 = ref["c0"]
    corpus = shared_data / "wikitext-2" / Path(c0["corpus"]).name
    return {"stats_sampling": c0["unit"], "stats_records": c0["records"],
            "stats_corpus": str(corpus)}


def hparams(method: str, ref, shared_data) -> Any:
    """The faithful preset's SmolLM2 hparams, with only the injected inputs overridden."""
    from methods import get_method
    from methods.base import load_hparams

    mod = get_method(method)
    texts = ref["templates"]["rome"] if method == "rome" else \
        [t for group in ref["templates"]["memit"] for t in group]
    run = ref["runs"][method]
    same = ["v_lr", "v_num_grad_steps", "v_weight_decay", "kl_factor",
            "clamp_norm_factor"] + {"rome": ["mom2_adjustment"],
                                    "memit": ["mom2_update_weight"],
                                    "alphaedit": ["L2", "nullspace_threshold"]}[method]
    hp, _ = load_hparams(mod.Hparams, method, "smollm2-135m", preset="faithful")
    file = run["hparams_file_llama3_8b"]  # the published file, before any adaptation
    differ = {k: (getattr(hp, k), file[k]) for k in same if getattr(hp, k) != file[k]}
    assert not differ, f"faithful preset differs from the published Llama-3-8B file: {differ}"
    # the fixture may have been recorded with fewer target steps (CPU time): same on both sides
    changed = {k: v for k, v in run["hparams_changed_from_llama3_8b"].items() if k in same}
    # the layers the fixture was recorded at (its ROME run: layer 6, the faithful file's layer
    # then; the file now takes the published layer 5): per-case parity holds at any layer
    hp, _ = load_hparams(mod.Hparams, method, "smollm2-135m", preset="faithful",
                         overrides={"context_template_texts": texts, **changed,
                                    "layers": list(run["hparams"]["layers"]),
                                    **stats_overrides(ref, shared_data)})
    return hp


@pytest.fixture()
def restore(lm) -> Iterator[None]:
    """Put the edited matrices back after a test."""
    saved = {name: p.detach().clone() for name, p in lm.model.named_parameters()
             if "mlp.down_proj" in name}
    yield
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, w in saved.items():
            params[name].copy_(w)


def run_harness(lm, method: str, hp, requests, batches, monkeypatch) -> dict[str, Any]:
    """Edit sequentially in the fixture's batches; record keys (solver inputs), targets and
    post-edit log-probabilities."""
    import methods.locate as locate
    from methods import get_method
    from suites.counterfact import evaluate

    got: dict[str, Any] = {"key": {}, "k_plain": {}, "z": {}}
    write_layers = locate.write_layers

    def recording(lm_, reqs, hp_, V, templates, solver):
        ids = [r.case_id for r in reqs]
        for j, cid in enumerate(ids):
            got["z"][cid] = V[:, j].detach().clone()

        def solve(layer, R, K, K_plain):
            for j, cid in enumerate(ids):
                got["key"][(layer, cid)] = K[:, j].detach().clone()
                got["k_plain"][(layer, cid)] = K_plain[:, j].detach().clone()
            return solver(layer, R, K, K_plain)

        return write_layers(lm_, reqs, hp_, V, templates, solve)

    monkeypatch.setattr(locate, "write_layers", recording)
    mod = get_method(method)
    by_id = {r.case_id: r for r in requests}
    if hasattr(mod, "prepare"):
        mod.prepare(lm, hp)
    state: dict[str, Any] = {}
    for batch in batches:
        out = mod.edit(lm, [by_id[str(c)] for c in batch], hp, state)
        state = out.state
    got["post"] = evaluate(lm, requests)
    return got


def mean_logprobs(rec: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Harness record -> {group: {"new": [...], "true": [...]}} of mean per-token log p."""
    out = {}
    for group in ("rewrite", "paraphrase", "neighborhood"):
        raw = rec["logprobs"][group]
        out[group] = {k: [sum(x) / len(x) for x in raw[k]] for k in ("new", "true")}
    return out


def logprob_errors(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> dict[str, float]:
    err: dict[str, float] = {}
    for g, w in zip(got, want, strict=True):
        assert g["case_id"] == str(w["case_id"])
        m = mean_logprobs(g)
        for group in ("rewrite", "paraphrase", "neighborhood"):
            for k in ("new", "true"):
                for a, b in zip(m[group][k], w[group][k], strict=True):
                    err[group] = max(err.get(group, 0.0), abs(a - b))
    return err


# ---------------------------------------------------------------------------------------------


def test_c0_matches_original_layer_stats(lm, ref, shared_data):
    """The harness's records-mode C0 on the same WikiText-2 records equals the original's
    ``layer_stats`` (float32 sums in another order: within ``C0_RTOL``), and is the C0 that was
    injected into the original when the fixture was made."""
    from methods import get_method
    from methods.base import load_hparams
    from methods.locate import layer_statistics

    c0 = ref["c0"]
    layers = sorted(int(x) for x in c0["original"])
    hp, _ = load_hparams(get_method("memit").Hparams, "memit", "smollm2-135m", preset="faithful",
                         overrides=stats_overrides(ref, shared_data))
    C0, _, _ = layer_statistics(lm, hp, layers)
    R = torch.randn(C0[layers[0]].shape[0], 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    worst = {}
    for layer in layers:
        C = C0[layer].double()
        for side in ("original", "harness"):
            want = c0[side][str(layer)]
            errs = [abs(float(C.trace()) - want["trace"]) / abs(want["trace"]),
                    abs(float(C.norm()) - want["fro"]) / want["fro"],
                    rel(C[:8, :8], torch.tensor(want["block8"])),
                    rel(C @ R, ref["tensors"][f"c0/{side}/sketch/{layer}"])]
            worst[side] = max(worst.get(side, 0.0), *errs)
    print(f"parity C0 (max relative error): {worst}")
    assert worst["original"] < C0_RTOL, worst
    assert worst["harness"] < C0_RTOL, worst


def test_scoring_matches_original_before_editing(lm, ref, requests_):
    """Unedited model: the harness's CounterFact log-probabilities equal the original's
    ``test_batch_prediction`` (isolates scoring from editing)."""
    from suites.counterfact import evaluate

    err = logprob_errors(evaluate(lm, requests_), ref["pre"])
    print(f"parity pre-edit log-probabilities: {err}")
    assert max(err.values()) < PRE_LP_ATOL, err


def parity_errors(method: str, hp, lm, ref, requests_, monkeypatch) -> dict[str, Any]:
    """Run the harness with ``hp`` on the fixture's batches and measure its distance to the
    original: the largest relative key and target errors and absolute log-prob errors."""
    run = ref["runs"][method]
    got = run_harness(lm, method, hp, requests_, run["batches"], monkeypatch)
    T = ref["tensors"]
    key_err: dict[str, float] = {}
    if method == "rome":
        layer = hp.layers[0]
        for cid in ref["data"]["case_ids"]:
            key_err["averaged"] = max(key_err.get("averaged", 0.0), rel(
                got["key"][(layer, str(cid))], T[f"rome/key/{cid}"]))
            key_err["plain"] = max(key_err.get("plain", 0.0), rel(
                got["k_plain"][(layer, str(cid))], T[f"rome/k_plain/{cid}"]))
    else:
        for layer in hp.layers:
            for cid in ref["data"]["case_ids"]:
                key_err[str(layer)] = max(key_err.get(str(layer), 0.0), rel(
                    got["key"][(layer, str(cid))], T[f"{method}/key/{layer}/{cid}"]))
    z_err = max(rel(got["z"][str(cid)], T[f"{method}/z/{cid}"])
                for cid in ref["data"]["case_ids"])
    return {"keys": key_err, "z": z_err, "logprob": logprob_errors(got["post"], run["post"])}


def within_tolerance(report: dict[str, Any]) -> bool:
    return (max(report["keys"].values()) < KEY_RTOL and report["z"] < Z_RTOL
            and max(report["logprob"].values()) < LP_ATOL)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_method_matches_original(method, lm, ref, requests_, shared_data, monkeypatch,
                                 restore):
    hp = hparams(method, ref, shared_data)
    report = parity_errors(method, hp, lm, ref, requests_, monkeypatch)
    if method == "alphaedit":  # same null-space dimension per layer as the original's SVD rule
        from methods.locate import projectors

        T = ref["tensors"]
        P = projectors(lm, hp, hp.layers)
        ranks = {layer: round(float(P[layer].double().trace())) for layer in hp.layers}
        want = {layer: int(T[f"alphaedit/projector_rank/{layer}"].item()) for layer in hp.layers}
        report["projector_rank"] = (ranks, want)
    print(f"parity {method}: {report}")  # measured agreement, shown with -s
    if method == "alphaedit":
        assert report["projector_rank"][0] == report["projector_rank"][1], report
    assert max(report["keys"].values()) < KEY_RTOL, report
    assert report["z"] < Z_RTOL, report
    assert max(report["logprob"].values()) < LP_ATOL, report


#: small real changes the tolerances must not let through (method, change to its hparams)
CHANGES = {
    "one target step fewer": ("alphaedit", lambda hp: {"v_num_grad_steps":
                                                        hp.v_num_grad_steps - 1}),
    "keys averaged uniformly": ("memit", lambda hp: {"key_averaging": "uniform"}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_small_real_change_breaks_parity(change, lm, ref, requests_, shared_data,
                                           monkeypatch, restore):
    """The tolerances are set from the measured spread between CPUs, not loose enough to
    hide a change of the algorithm: one target step fewer, or MEMIT's keys averaged over
    the prefixes uniformly instead of as the original averages them."""
    import dataclasses

    method, edit = CHANGES[change]
    hp = hparams(method, ref, shared_data)
    hp = dataclasses.replace(hp, **edit(hp))
    report = parity_errors(method, hp, lm, ref, requests_, monkeypatch)
    print(f"parity under '{change}': {report}")
    assert not within_tolerance(report), report
