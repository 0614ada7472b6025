"""Every shipped hparams YAML parses into its method's dataclass (unknown keys are errors)."""

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
    assert getattr(hp, "layers", [0])


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
