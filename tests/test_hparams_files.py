"""Every shipped hparams YAML parses into its method's dataclass (unknown keys are errors)."""

import json
from pathlib import Path

import pytest

from harness.errors import UserError
from methods import METHODS, get_method
from methods.base import HPARAMS_DIR, load_hparams

FILES = sorted(HPARAMS_DIR.glob("*/*.yaml"))


def test_every_hparams_dir_names_a_method():
    assert FILES
    assert {p.parent.name for p in FILES} <= set(METHODS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_hparams_file_parses(path: Path):
    mod = get_method(path.parent.name)
    hp, source = load_hparams(mod.Hparams, path.parent.name, path.stem, path)
    assert source == str(path)
    assert getattr(hp, "layers", [0]) or getattr(hp, "edit_modules", [])  # something edited


def test_unknown_key_and_bad_type_are_named(tmp_path):
    mod = get_method("alphaedit")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [4]\nL3: 1\n")
    with pytest.raises(UserError, match=r"unknown hyperparameter.*L3"):
        load_hparams(mod.Hparams, "alphaedit", "x", bad)
    bad.write_text("layers: four\n")
    with pytest.raises(UserError, match="field 'layers'"):
        load_hparams(mod.Hparams, "alphaedit", "x", bad)
    bad.write_text("layers: [8, 4]\n")
    with pytest.raises(UserError, match="strictly increasing"):
        load_hparams(mod.Hparams, "alphaedit", "x", bad)
    bad.write_text("layers: [4\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_hparams(mod.Hparams, "alphaedit", "x", bad)


@pytest.mark.parametrize("model", ["llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct",
                                   "random:llama3-8b"])
def test_published_hparams_follow_the_model_family(model):
    """A short name, its hub id and the random model of its shape all get the published
    file; other models get the method's defaults."""
    for method in ("alphaedit", "metake", "rome"):
        hp, source = load_hparams(get_method(method).Hparams, method, model)
        assert source == str(HPARAMS_DIR / method / "llama3-8b.yaml")
        assert hp.layers == ([5] if method == "rome" else [4, 5, 6, 7, 8])
    _, source = load_hparams(get_method("alphaedit").Hparams, "alphaedit", "random:llama-tiny")
    assert source == "dataclass defaults"


# --- faithful preset: the published files, key by key -------------------------------------

ORIGINAL = json.loads((Path(__file__).parent / "fixtures" / "original_hparams.json").read_text())

#: original key -> harness field (same value)
SAME = {"layers": "layers", "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor",
        "v_lr": "v_lr", "v_num_grad_steps": "v_num_grad_steps",
        "v_weight_decay": "v_weight_decay", "nullspace_threshold": "nullspace_threshold",
        "L2": "L2", "context_template_length_params": "context_templates",
        "mom2_n_samples": "stats_records"}
#: keys compared only for some methods, and why the others have none
PER_METHOD = {("mom2_update_weight", "memit"): "mom2_update_weight",
              ("mom2_adjustment", "rome"): "mom2_adjustment"}
#: original keys with no harness counterpart, and why (the test fails on any other key)
NO_COUNTERPART = {
    "fact_token": "always subject_last: the harness edits at the subject's last token",
    "layer_selection": "'all' is the only value and the original code does not read it",
    "v_loss_layer": "always the last layer: the target loss reads the model's own logits",
    "mom2_dataset": "Wikipedia; the harness reads WikiText or a given corpus (stats_corpus)",
    "mom2_dtype": "float32; the harness accumulates in its statistics' dtype",
    "mom2_update_weight": "AlphaEdit's solve does not use it (only MEMIT's)",
    "mom2_adjustment": "MEMIT/AlphaEdit do not read it (their solves always use C0)",
}


def _files():
    return sorted(ORIGINAL["files"].items())


@pytest.mark.parametrize("name,orig", _files(), ids=[k for k, _ in _files()])
def test_faithful_published_files_equal_the_original_json(name, orig):
    """methods/hparams/<method>/<model>.yaml (the faithful preset) holds the released
    file's value for every key the harness has; every other key is listed with a reason."""
    method, model = name.split("/")
    hp, source = load_hparams(get_method(method).Hparams, method, model, preset="faithful")
    assert source == str(HPARAMS_DIR / method / f"{model}.yaml")
    for key, value in orig.items():
        field = SAME.get(key) or PER_METHOD.get((key, method))
        if field is None:
            assert key in NO_COUNTERPART, f"{name}: original key {key!r} is not accounted for"
            continue
        got = getattr(hp, field)
        if isinstance(value, list):
            assert [list(x) if isinstance(x, list | tuple) else x for x in got] == value, key
        else:
            assert got == value, f"{name}: {key} is {got!r}, the original has {value!r}"
    # switches that the original code fixes (no JSON key): its key averaging and templates
    if method == "rome":
        assert (hp.key_averaging, hp.value_site, hp.denominator_key) == ("uniform", "mlp",
                                                                          "plain")
    else:
        assert hp.key_averaging == "original" and hp.context_templates == [[10, 5]]
    assert hp.v_steps is None and hp.n_context is None and hp.context_template_texts is None
    assert hp.stats_sampling == "records"  # mom2_n_samples counts records, one sequence each


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_faithful_adaptation_uses_the_llama3_target_step(model):
    """The default files of the small models: the published switches and the published
    Llama-3-8B target step (the layers come from the sweep)."""
    for method in ("alphaedit", "memit", "rome"):
        hp, _ = load_hparams(get_method(method).Hparams, method, model)
        orig = ORIGINAL["files"][f"{method}/llama3-8b"]
        for key in ("v_lr", "v_num_grad_steps", "v_weight_decay", "kl_factor",
                    "clamp_norm_factor"):
            assert getattr(hp, key) == orig[key], (method, key)
        assert hp.v_steps is None and hp.n_context is None
        if method == "rome":
            assert hp.mom2_adjustment is orig["mom2_adjustment"]
            assert hp.context_templates == orig["context_template_length_params"]


LOWER = ("layers", "v_lr", "v_num_grad_steps", "v_steps", "v_weight_decay", "kl_factor",
         "clamp_norm_factor", "context_templates", "context_template_texts", "n_context",
         "context_length", "key_averaging", "value_site", "stats_tokens", "stats_corpus",
         "stats_seq_len", "stats_sampling", "stats_records", "nullspace_threshold", "L2",
         "solve_dtype")


@pytest.mark.parametrize("preset", ["faithful", "tuned"])
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m", "gpt2-xl", "gpt-j-6b",
                                   "llama3-8b"])
def test_metake_lower_level_equals_alphaedit(model, preset):
    """MetaKE and its ablations use AlphaEdit's setting of the same preset as their lower
    level, so that comparisons isolate the target learning."""
    if preset == "tuned" and model not in ("smollm2-135m", "gemma3-270m"):
        pytest.skip("no tuned preset for the published models")
    base, _ = load_hparams(get_method("alphaedit").Hparams, "alphaedit", model, preset=preset)
    for method in ("metake", "metake-noproxy", "alphaedit-rescaled"):
        hp, _ = load_hparams(get_method(method).Hparams, method, model, preset=preset)
        for key in LOWER:
            assert getattr(hp, key) == getattr(base, key), (method, key)


def test_presets_pick_their_files_and_name_missing_ones():
    hp, source = load_hparams(get_method("rome").Hparams, "rome", "smollm2-135m",
                              preset="tuned")
    assert source == str(HPARAMS_DIR / "rome" / "smollm2-135m-tuned.yaml")
    assert (hp.denominator_key, hp.value_site, hp.v_steps) == ("averaged", "residual", 25)
    with pytest.raises(UserError, match=r"--preset tuned.*'alphaedit'.*gpt2-xl.*smollm2-135m"):
        load_hparams(get_method("alphaedit").Hparams, "alphaedit", "gpt2-xl", preset="tuned")
    with pytest.raises(UserError, match="faithful, tuned"):
        load_hparams(get_method("alphaedit").Hparams, "alphaedit", "gpt2-xl", preset="best")
    # a method with one setting only has no preset: the same file under both
    a, sa = load_hparams(get_method("ft").Hparams, "ft", "smollm2-135m", preset="tuned")
    b, sb = load_hparams(get_method("ft").Hparams, "ft", "smollm2-135m")
    assert sa == sb and a == b


def test_tuned_preset_without_a_tuned_file_is_an_error_except_for_one_setting_methods():
    """No table may label faithful numbers "tuned": a method without a tuned file for the
    model refuses --preset tuned; ft and noop (one setting) use their only file."""
    for name in ("prune", "r-rome"):
        with pytest.raises(UserError, match="no tuned hparams"):
            load_hparams(get_method(name).Hparams, name, "smollm2-135m", preset="tuned")
    _, source = load_hparams(get_method("ft").Hparams, "ft", "smollm2-135m", preset="tuned")
    assert source.endswith("ft/smollm2-135m.yaml")
    _, source = load_hparams(get_method("rome").Hparams, "rome", "smollm2-135m", preset="tuned")
    assert source.endswith("rome/smollm2-135m-tuned.yaml")


def test_a_published_model_without_a_file_is_refused_not_defaulted():
    """EMMET released no Llama-3-8B file: a faithful run on the real model (short name or hub
    id) stops with the files there are, instead of silently running the dataclass defaults;
    a random model of that shape (edits that mean nothing) still takes them."""
    cls = get_method("emmet").Hparams
    for model in ("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct"):
        with pytest.raises(UserError, match=r"'emmet' ships no hparams for the published "
                                            r"model 'llama3-8b' .*gpt2-xl.*pass --hparams"):
            load_hparams(cls, "emmet", model)
    _, source = load_hparams(cls, "emmet", "random:llama3-8b")
    assert source == "dataclass defaults"
    _, source = load_hparams(get_method("noop").Hparams, "noop", "llama3-8b")
    assert source == "dataclass defaults"
