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
