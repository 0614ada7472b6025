"""``python -m harness.perf``: phase timings, also for several batch sizes (issue 17: time per
edit at batch 100 against batch 10), on a tiny random model."""

from __future__ import annotations

import json

from harness import perf


def test_perf_times_each_batch_size(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    rc = perf.main(["--model", "random:llama-tiny", "--device", "cpu", "--methods", "alphaedit",
                    "--batch-size", "2,4", "--n-cases", "2", "--stats-tokens", "2000",
                    "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "random_llama-tiny_float32.json").read_text())
    for size in (2, 4):
        ph = report["phases"][f"edit:alphaedit@{size}"]
        assert ph["batch"] == size and ph["s_per_edit"] > 0
    assert "edit:alphaedit@4" in (tmp_path / "random_llama-tiny_float32.md").read_text()
