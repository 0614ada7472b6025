"""The grid schema (:mod:`harness.grid`): every ``keh run`` option is a grid key with the same
name and default, old key names still work, and the shipped paper grid's dtypes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from harness.config import RunConfig
from harness.errors import UserError
from harness.grid import ALIASES, AXES, GRIDS, NOT_IN_GRIDS, Grid, load_grid

BASE = {"models": ["random:llama-tiny"], "methods": ["rome", "ft"], "suites": ["zsre"]}


def write(tmp_path, part):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(part))
    return str(path)


def test_every_run_option_is_a_grid_key_with_its_default():
    grid_keys = {f.name for f in dataclasses.fields(Grid)}
    per_run = {"out_dir": "out", "hparams": "hparams", "hparams_overrides": "set"}
    defaults = Grid(**BASE)
    for f in dataclasses.fields(RunConfig):
        if f.name in AXES:
            assert AXES[f.name] in grid_keys
        elif f.name not in NOT_IN_GRIDS and f.name not in per_run:
            assert f.name in grid_keys, f.name
            assert getattr(defaults, f.name) == getattr(RunConfig(), f.name), f.name
    cfg = defaults.configs()[0]
    assert dataclasses.replace(cfg, model="smollm2-135m", method="noop", suite="counterfact",
                               out_dir="runs") == RunConfig()


def test_a_grid_sets_each_run_option(tmp_path):
    cfgs = [c for g in load_grid(write(tmp_path, {
        **BASE, "answer_tokens": 4, "zsre_target": "alt", "fluency_decoding": "greedy",
        "downstream_fewshot": 2, "eval_batch_size": 8, "dtype": "bfloat16",
        "hparams": {"rome": "my-rome.yaml"}, "set": {"ft": {"layers": [1]}},
        "out": "somewhere"})) for c in g.configs()]
    rome, ft = cfgs
    for c in cfgs:
        assert (c.answer_tokens, c.zsre_target, c.fluency_decoding, c.downstream_fewshot,
                c.eval_batch_size, c.dtype, c.out_dir) == (4, "alt", "greedy", 2, 8,
                                                            "bfloat16", "somewhere")
    assert (rome.method, rome.hparams, rome.hparams_overrides) == ("rome", "my-rome.yaml", {})
    assert (ft.method, ft.hparams, ft.hparams_overrides) == ("ft", None, {"layers": [1]})


def test_old_key_names_are_aliases(tmp_path):
    new = [c for g in load_grid(write(tmp_path, {**BASE, "out": "o", "set": {"ft": {"a": 1}}}))
           for c in g.configs()]
    old = [c for g in load_grid(write(tmp_path, {**BASE, "out_dir": "o",
                                                 "hparams_overrides": {"ft": {"a": 1}}}))
           for c in g.configs()]
    assert old == new and ALIASES == {"out_dir": "out", "hparams_overrides": "set"}
    with pytest.raises(UserError, match="out_dir and out name the same setting; keep out"):
        load_grid(write(tmp_path, {**BASE, "out": "o", "out_dir": "p"}))


def test_per_method_keys_must_name_a_method_of_the_grid(tmp_path):
    with pytest.raises(UserError, match=r"hparams/set name method\(s\) memit that are not in"):
        load_grid(write(tmp_path, {**BASE, "set": {"memit": {"layers": [1]}}}))


def test_paper_grid_runs_the_large_models_in_bfloat16():
    dtypes = {c.model: c.dtype for g in load_grid("paper") for c in g.configs()}
    assert dtypes == {"gpt2-xl": "float32", "gpt-j-6b": "bfloat16", "llama3-8b": "bfloat16"}


@pytest.mark.parametrize("name", sorted(g.stem for g in GRIDS.glob("*.yaml")))
def test_every_cell_of_a_shipped_grid_has_its_hparams_file(name):
    """Every cell's method has a file for its model and preset (a faithful run without one
    would silently take the dataclass defaults), e.g. the lifelong methods in ``paper``."""
    from methods import get_method
    from methods.base import load_hparams

    for entry in load_grid(name):
        for c in entry.configs():
            if c.hparams is None and c.method != "noop":  # noop has no parameters
                _, source = load_hparams(get_method(c.method).Hparams, c.method, c.model,
                                         preset=c.preset)
                assert source.endswith(".yaml") and not source.endswith("default.yaml"), (
                    c.method, c.model, source)


def test_an_empty_axis_is_refused(tmp_path):
    with pytest.raises(UserError, match="methods empty: name at least one"):
        load_grid(write(tmp_path, {**BASE, "methods": []}))


def test_a_shipped_grid_name_is_not_shadowed_by_the_working_directory(tmp_path, monkeypatch):
    """``--grid default`` is the shipped grid even where the working directory holds a folder
    or a file named ``default``; a path is a name with a slash or a YAML suffix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    (tmp_path / "smoke").write_text("not: a grid\n")
    assert [g.methods for g in load_grid("default")] == [
        g.methods for g in load_grid(str(GRIDS / "default.yaml"))]
    assert len(load_grid("smoke")) == 2
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(BASE))
    assert load_grid("mine.yaml")[0].methods == ["rome", "ft"]
