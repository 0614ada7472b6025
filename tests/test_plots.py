"""Figures stay readable with many methods: one colour per arm, and the forest plot of the main
metrics puts every method on its own labelled row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from reports.plots import _colors, plot_metrics
from reports.tables import Table


@pytest.mark.parametrize("n", [1, 3, 10, 11, 18, 20, 25])
def test_every_arm_gets_its_own_colour(n):
    arms = [f"arm{i}" for i in range(n)]
    colours = _colors(arms)
    assert list(colours) == arms
    assert len({to_hex(c) for c in colours.values()}) == n


def test_forest_plot_has_one_labelled_row_per_method(tmp_path, monkeypatch):
    from reports import plots

    arms = [f"method-{i}" for i in range(14)] + ["noop"]
    rng = np.random.default_rng(0)
    raw = {"method": arms, "runs": [1] * len(arms)}
    for c in ("Eff", "Gen", "Spe"):
        m = rng.uniform(20, 90, len(arms))
        raw |= {c: m, f"{c}_lo": m - 5, f"{c}_hi": m + 5}
    raw["Spe_lo"][3] = np.nan  # an undefined interval draws the dot alone
    table = Table("main", "", pd.DataFrame(raw), pd.DataFrame())
    runs = type("R", (), {})()
    runs.frame = pd.DataFrame({"suite": ["counterfact"], "model": ["toy"], "arm": ["x"]})
    monkeypatch.setattr(plots, "resampling_unit", lambda frame: "cases")
    drawn, save = {}, plots._save

    def keep(fig, directory, name):
        drawn["fig"] = fig
        return save(fig, directory, name)

    monkeypatch.setattr(plots, "_save", keep)
    fig = plot_metrics(runs, table, tmp_path)
    assert fig.path is not None and fig.path.read_bytes()[:4] == b"\x89PNG"
    axes = drawn["fig"].axes
    assert len(axes) == 3
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert sorted(labels) == sorted(f"{a} (1 run)" for a in arms)
    top = dict(zip(axes[0].get_yticks(), labels, strict=True))[max(axes[0].get_yticks())]
    assert top == "method-0 (1 run)"  # the table's first row is drawn at the top
    assert "dashed: the unedited model" in fig.caption
    for ax, c in zip(axes, ("Eff", "Gen", "Spe"), strict=True):
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(dashed) == 1 and dashed[0].get_xdata()[0] == pytest.approx(raw[c][-1])
