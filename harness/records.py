"""Run directory I/O: append-only records.jsonl (whole lines, fsync'd) and an atomic manifest."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from harness.cachefiles import atomic_write_text
from harness.runfiles import CURVE, MANIFEST, RECORDS  # noqa: F401  (re-exported)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (never a silent NaN in a table), tensors -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def dumps_record(record: dict[str, Any]) -> str:
    """One canonical JSON line (sorted keys, no NaN) for a record."""
    return json.dumps(_clean(record), sort_keys=True, allow_nan=False)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append whole lines and fsync. A crash can only lose the last, unterminated line,
    which :func:`read_records` drops (and a resume truncates)."""
    if not records:
        return
    blob = "".join(dumps_record(r) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a run; a trailing partial line (killed mid-write) is ignored, or cut off
    the file when ``repair``."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return [json.loads(line) for line in raw[:end].decode("utf-8").splitlines() if line.strip()]


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("keh", "torch", "transformers", "accelerate", "datasets", "lm_eval", "numpy",
                "scipy", "pandas", "safetensors", "gguf", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def git_revision(root: Path | None = None) -> dict[str, Any]:
    """Commit of the harness's own checkout and whether it has uncommitted changes."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": rev or None, "dirty": bool(dirty) if rev else None}


#: what a run's numbers depend on, as git pathspecs: the code and hparams files, not the grid
#: files (adding a cell to a grid changes no run) and not the prose
CODE_PATHS = ("harness", "methods", "suites", ":(exclude)harness/grids",
              ":(exclude,glob)**/*.md")


def code_changed(old: str | None, new: str | None, root: Path | None = None) -> bool:
    """Whether the files of :data:`CODE_PATHS` differ between the commits ``old`` and ``new``
    of the harness's checkout: False for the same commit (uncommitted changes are not seen),
    True where git cannot tell (a commit it does not know, no git)."""
    if old == new:
        return False
    if not old or not new:
        return True
    root = root or Path(__file__).resolve().parent.parent
    try:
        rc = subprocess.run(["git", "diff", "--quiet", old, new, "--", *CODE_PATHS], cwd=root,
                            capture_output=True, timeout=30, check=False).returncode
    except (OSError, subprocess.SubprocessError):
        return True
    return rc != 0


def device_description(device: torch.device) -> dict[str, Any]:
    d: dict[str, Any] = {"device": str(device), "platform": platform.platform(),
                         "processor": platform.processor() or platform.machine(),
                         "torch_threads": torch.get_num_threads()}
    # set by `python -m harness.benchmark --jobs N`: timings then share the device with N-1 runs
    jobs = os.environ.get("KEH_CONCURRENT_JOBS")
    if jobs:
        d["concurrent_jobs"] = int(jobs)
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
        d["cuda"] = torch.version.cuda
    return d


def memory_now(device: torch.device) -> dict[str, float]:
    """Memory in use now and the peak so far (MiB): process RSS (``/proc/self/status`` where
    there is one) and, on CUDA, allocated device memory. Written into every curve line, so a
    long sequential run shows whether memory grows with the edits."""
    out = peak_memory(device)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mib"] = int(line.split()[1]) / 1024.0
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    if device.type == "cuda":
        out["cuda_mib"] = torch.cuda.memory_allocated(device) / 2**20
    return out


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far: process RSS (MiB) and, on CUDA, allocated device memory (MiB)."""
    out: dict[str, float] = {}
    try:
        import resource

        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # pragma: no cover - non-POSIX
        pass
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
