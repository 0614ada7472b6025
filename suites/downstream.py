"""Downstream (general-ability) evaluation through lm-evaluation-harness, on the in-memory model.

keh ships offline multiple-choice tasks, ``suites/lm_eval_tasks/keh_<name>.yaml`` for
:data:`LOCAL_TASKS` (SST-2, MRPC, CoLA, RTE, an MNLI-style NLI set and MMLU: the six tasks of the
"model editing at scale" downstream evaluation, Gupta et al. 2024, following Gu et al. 2024,
"Model editing harms general abilities of LLMs"). They read the JSONL files of the data directory
(layout in the data README): the first 10 records of each file are the few-shot pool
(``fewshot_split``, taken in order), the rest are evaluated; accuracy is lm-eval's
multiple-choice ``acc`` (argmax of the summed log-likelihood of each choice).

The YAMLs hold the placeholders ``@KEH_DATA_DIR@`` and ``@KEH_DATASETS_CACHE@``; at run time they
are rendered into a temporary directory with the data directory and a temporary datasets cache
filled in, so nothing is written to the user's Hugging Face cache and the directory is removed
afterwards. Any other name is passed to lm-eval as a built-in task (which needs the network to
fetch its dataset); lm-eval's own task index is loaded only then.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import UserError

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
#: keh task name -> data file under the data directory
LOCAL_TASKS: dict[str, str] = {
    "sst2": "glue/sst2.jsonl",
    "mrpc": "glue/mrpc.jsonl",
    "cola": "glue/cola.jsonl",
    "rte": "glue/rte.jsonl",
    "nli": "glue/nli.jsonl",
    "mmlu": "glue/mmlu.jsonl",
}
N_FEWSHOT_POOL = 10
_PREFIX = "keh_"
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def lm_eval_name(task: str) -> str:
    """The lm-eval task name for a requested name (keh's own tasks carry a ``keh_`` prefix so
    they never clash with lm-eval's built-in ``sst2``, ``mmlu``, ...)."""
    return _PREFIX + task if task in LOCAL_TASKS else task


def parse_tasks(text: str) -> list[str]:
    """``"sst2, mrpc"`` -> ``["sst2", "mrpc"]`` (empty items dropped, order kept, no repeats)."""
    out: list[str] = []
    for t in (s.strip() for s in text.split(",")):
        if t and t not in out:
            out.append(t)
    return out


def _offline() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0", "false", "False")
               for v in _OFFLINE_VARS)


def check_tasks(tasks: Sequence[str], data_dir: str | Path, num_fewshot: int) -> None:
    """Fail early (before a model is loaded) on tasks that cannot run: a missing data file,
    more few-shot examples than the pool holds, or a built-in task while offline."""
    for t in tasks:
        if t in LOCAL_TASKS:
            path = Path(data_dir) / LOCAL_TASKS[t]
            if not path.is_file():
                raise UserError(f"downstream task {t!r} needs {path}; run `keh data fetch "
                                f"downstream`, or set --data-dir or KEH_DATA_DIR to the data "
                                f"directory")
            if num_fewshot > N_FEWSHOT_POOL:
                raise UserError(f"--downstream-fewshot {num_fewshot}: task {t!r} reserves only "
                                f"{N_FEWSHOT_POOL} few-shot examples")
        elif _offline():
            raise UserError(
                f"downstream task {t!r} is not one of keh's offline tasks "
                f"({', '.join(LOCAL_TASKS)}); lm-eval's built-in tasks download their data, "
                f"which is off here ({'/'.join(_OFFLINE_VARS)} set)")
    builtin = [t for t in tasks if t not in LOCAL_TASKS]
    if builtin:
        known = builtin_task_names()
        unknown = [t for t in builtin if t not in known]
        if unknown:
            raise UserError(
                f"--downstream: unknown task(s) {', '.join(unknown)}; keh's offline tasks are "
                f"{', '.join(LOCAL_TASKS)}, other names must be lm-eval tasks "
                f"(lm-eval ls tasks lists them)")


def builtin_task_names() -> set[str]:
    """Names of lm-eval's built-in tasks, groups and tags (indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


def render_task_dir(data_dir: str | Path, out_dir: Path, datasets_cache: Path) -> Path:
    """Copy the task YAMLs (placeholders filled in) and their helper module into ``out_dir``."""
    data_dir = Path(data_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASK_DIR.glob("*.yaml")):
        text = src.read_text(encoding="utf-8")
        text = text.replace("@KEH_DATA_DIR@", data_dir.as_posix())
        text = text.replace("@KEH_DATASETS_CACHE@", datasets_cache.as_posix())
        (out_dir / src.name).write_text(text, encoding="utf-8")
    shutil.copy2(TASK_DIR / "utils.py", out_dir / "utils.py")
    return out_dir


@contextmanager
def rendered_tasks(data_dir: str | Path) -> Iterator[Path]:
    """A temporary directory holding the rendered tasks and an empty datasets cache."""
    with tempfile.TemporaryDirectory(prefix="keh_lm_eval_") as tmp:
        root = Path(tmp)
        yield render_task_dir(data_dir, root / "tasks", root / "datasets_cache")


def run_lm_eval(lm, tasks: Sequence[str], data_dir: str | Path, limit: int | None = None,
                num_fewshot: int = 0, batch_size: int = 8,
                log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's raw result dict for ``tasks`` (keh names or built-in names) on ``lm.model``.

    The global random, numpy and torch seeds are left alone (an editing run has set them);
    the few-shot sampler has its own fixed seed.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise UserError("no downstream tasks given")
    check_tasks(tasks, data_dir, num_fewshot)
    include_defaults = any(t not in LOCAL_TASKS for t in tasks)
    with rendered_tasks(data_dir) as task_dir:
        manager = TaskManager(include_path=str(task_dir), include_defaults=include_defaults)
        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size,
                     device=str(lm.device))
        results = simple_evaluate(
            model=model, tasks=[lm_eval_name(t) for t in tasks], task_manager=manager,
            limit=limit or None, num_fewshot=num_fewshot, log_samples=log_samples,
            bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
            torch_random_seed=None, fewshot_random_seed=1234,
        )
    if results is None:  # pragma: no cover - only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    return results


def accuracy_stderr(acc: float, n: int) -> float | None:
    """Standard error of a mean of n Bernoulli outcomes, sqrt(acc (1 - acc) / (n - 1))."""
    return math.sqrt(acc * (1.0 - acc) / (n - 1)) if n > 1 else None


def extract_scores(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{task: {"acc", "acc_stderr", "n"}} from lm-eval's result dict, keyed by requested name."""
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        name = lm_eval_name(t)
        res = results["results"].get(name, {})
        acc = res.get("acc,none", res.get("acc"))
        n_samples = results.get("n-samples", {}).get(name, {})
        n = int(n_samples.get("effective", n_samples.get("original", 0)))
        out[t] = {"acc": None if acc is None else float(acc),
                  "acc_stderr": None if acc is None else accuracy_stderr(float(acc), n),
                  "n": n}
    return out


def evaluate_downstream(lm, tasks: list[str], data_dir: str | Path, limit: int | None = 200,
                        num_fewshot: int = 0, batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Accuracy of the in-memory (possibly edited) model on each task:
    ``{task: {"acc": float, "acc_stderr": float, "n": examples evaluated}}``.
    ``limit`` (None or 0: all) caps the examples per task, taken in file order after the few-shot
    pool."""
    results = run_lm_eval(lm, tasks, data_dir, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size)
    return extract_scores(results, tasks)


def unedited_cache_key(lm, tasks: Sequence[str], data_dir: str | Path, limit: int | None,
                       num_fewshot: int, batch_size: int) -> dict[str, Any] | None:
    """What determines the unedited model's downstream scores, or None when they cannot be
    cached (a built-in lm-eval task, whose data may change, or a model without a hash):
    model sha256, dtype and device type, the tasks with the sha256 of their data files and
    of keh's task YAMLs, limit, shots, batch size and the lm-eval version."""
    if not getattr(lm, "sha256", None) or any(t not in LOCAL_TASKS for t in tasks):
        return None
    from importlib.metadata import version

    from harness.models import sha256_file

    yamls = hashlib.sha256()
    for f in sorted(TASK_DIR.glob("*")):
        if f.is_file():
            yamls.update(f.name.encode() + f.read_bytes())
    return {"model_sha256": lm.sha256, "dtype": str(next(lm.model.parameters()).dtype),
            "device_type": lm.device.type, "tasks": list(tasks),
            "data_sha256": {t: sha256_file(Path(data_dir) / LOCAL_TASKS[t]) for t in tasks},
            "task_files_sha256": yamls.hexdigest(), "limit": limit or None,
            "num_fewshot": num_fewshot, "batch_size": batch_size,
            "lm_eval": version("lm_eval")}


def evaluate_unedited(lm, tasks: list[str], data_dir: str | Path, cache_dir: Path | None,
                      limit: int | None = 200, num_fewshot: int = 0, batch_size: int = 8
                      ) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """:func:`evaluate_downstream` for the *unedited* model, cached on disk as JSON under
    ``cache_dir/<sha256 of the key>.json`` (see :func:`unedited_cache_key`): every run of a
    grid starts from the same model, so its before-editing scores are measured once. Returns
    the scores and the cache file (None when not cacheable or ``cache_dir`` is None)."""
    key = unedited_cache_key(lm, tasks, data_dir, limit, num_fewshot, batch_size)
    if key is None or cache_dir is None:
        return evaluate_downstream(lm, tasks, data_dir, limit, num_fewshot, batch_size), None
    from harness.cachefiles import key_lock

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = cache_dir / (name + ".json")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with key_lock(cache_dir / ".locks", [name]):  # a concurrent run with the same key measures once
        scores = read_cache(path, key)
        if scores is not None:
            return scores, path
        scores = evaluate_downstream(lm, tasks, data_dir, limit, num_fewshot, batch_size)
        write_cache(path, key, scores)
    return scores, path


def write_cache(path: Path, key: dict[str, Any], scores: dict[str, Any]) -> None:
    """Atomically write a cache file ``{key, scores, sha256}``; ``sha256`` is the content hash
    of ``{key, scores}`` (:func:`harness.cachefiles.content_sha256`)."""
    from harness.cachefiles import atomic_write_text, content_sha256

    body = {"key": key, "scores": scores}
    atomic_write_text(path, json.dumps({**body, "sha256": content_sha256(body)}, indent=2,
                                       sort_keys=True) + "\n")


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The scores of a cache file for ``key``, or None if absent, of another key, or damaged
    (unreadable, or its content hash does not match: warned, then measured again)."""
    import warnings

    from harness.cachefiles import content_sha256

    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        body = {"key": stored["key"], "scores": stored["scores"]}
        intact = stored.get("sha256") == content_sha256(body)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring damaged downstream cache file {path} ({exc}); measuring "
                      f"again", stacklevel=3)
        return None
    if not intact:
        why = ("has no content hash (an older keh wrote it)" if "sha256" not in stored
               else "its content hash does not match (modified or damaged)")
        warnings.warn(f"ignoring downstream cache file {path}: {why}; measuring again",
                      stacklevel=3)
        return None
    return body["scores"] if body["key"] == key else None
