"""Shared fixtures. Tiers: pure maths (no model), a tiny random HF model (fast pipeline tests),
the real SmolLM2 (``slow`` marker, still part of ``nox -s tests``), ``gpu`` (skipped without
CUDA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

# transformers binds its log handler to whatever sys.stderr is at its first log call; make that
# the session's stderr now, not a test's capsys stream that pytest closes after the test (a later
# warning then printed "--- Logging error --- I/O operation on closed file", order-dependent)
hf_logging.get_logger("transformers")

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    env = os.environ.get("KEH_DATA_DIR")
    if env:
        return Path(env)
    return ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "counterfact" / "counterfact-edit.json").exists():
        pytest.fail(f"shared data not found at {d}; set KEH_DATA_DIR")
    return d


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def tiny_lm():
    """A randomly initialised 4-layer Llama with SmolLM2's tokenizer (seconds to build)."""
    from harness.models import load_model

    return load_model("random:llama-tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A randomly initialised 3-layer GPT-2 (Conv1D rewrite modules, learned positions)."""
    from harness.models import load_model

    return load_model("random:gpt2-tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3():
    """A randomly initialised 4-layer Gemma 3 (a norm after the MLP, sliding-window layers)."""
    from harness.models import load_model

    return load_model("random:gemma3-tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32, CPU). Tests must restore any weight they edit."""
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def corpus(tmp_path, monkeypatch, shared_data):
    """WikiText-2 for key statistics, with a per-test statistics cache."""
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    return str(shared_data / "wikitext-2" / "valid.txt")


@pytest.fixture
def restore(tiny_lm):
    """Put every rewrite matrix of the shared tiny model back after the test."""
    snap = {layer: tiny_lm.rewrite_weight(layer).clone() for layer in range(tiny_lm.n_layers)}
    yield
    with torch.no_grad():
        for layer, w in snap.items():
            tiny_lm.rewrite_weight(layer).copy_(w)
