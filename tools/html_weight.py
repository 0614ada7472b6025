"""Page weight and load time of ``index.html`` (issue 34), on synthetic runs.

    python tools/html_weight.py build --cases 100 --arms 14 --out /tmp/w100
    python tools/html_weight.py build --cases 10000 --arms 20 --out /tmp/w10k --n-resamples 100
    python tools/html_weight.py measure /tmp/w100/report/index.html /tmp/w10k/report/index.html

``build``: one synthetic run per arm (``tests/test_reports_build.make_run``: a sequential
run, batches of 2, seed 0), arms = every registered method, then MetaKE over MEMIT / EMMET /
ROME, MetaKE over BLUE, and AlphaEdit and MEMIT with the tuned preset, up to ``--arms``; the
cases are the first ``--cases`` CounterFact records of ``$KEH_DATA_DIR`` (real prompts and
targets), each record with greedy answers (the target, the true object or a varied phrase) and
the exact-match fields that follow from them (kept: a second call with the same ``--out``
reuses them); then ``keh report``'s :func:`build_report`.

``measure``: opens each page from disk in headless Chromium (playwright, ``--executable``)
``--repeat`` times and prints the file size, the embedded explorer data, the navigation's
DOMContentLoaded and load events, the moment the explorer has decoded its data and drawn its
first page (all from navigation start), the time of a filter (the last method's Eff =
100%), of an ordering by one arm's margin and of the first text search,
and the JavaScript heap; medians over the repeats.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: arms beyond the registered methods: (method, hparams, preset)
EXTRA_ARMS = [("metake", {"layers": [1], "solver": "memit"}, None),
              ("metake", {"layers": [1], "solver": "emmet"}, None),
              ("metake", {"layers": [1], "solver": "rome"}, None),
              ("metake", {"layers": [1], "write_plan": "blue"}, None),
              ("alphaedit", None, "tuned"), ("memit", None, "tuned")]
WORDS = ("city", "language", "river", "team", "company", "country", "music", "king",
         "church", "island", "film", "school", "party", "army", "road", "station")


def _arms(n: int) -> list[tuple[str, dict | None, str | None]]:
    from methods import METHODS

    arms = [(m, None, None) for m in METHODS] + EXTRA_ARMS
    if n > len(arms):
        raise SystemExit(f"at most {len(arms)} arms")
    return arms[:n]


def _answer(rng: np.random.Generator, hit: bool, right: str, wrong: str) -> str:
    if hit:
        return right
    r = rng.uniform()
    return wrong if r < 0.5 else f"the {wrong} {rng.choice(WORDS)} of {rng.integers(1, 999)}"


def build(n_cases: int, n_arms: int, out: Path, n_resamples: int) -> Path:
    from harness.paths import data_dir
    from reports.build import build_report
    from tests.test_reports_build import make_run

    data = data_dir() / "counterfact" / "counterfact-edit.json"
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    records = json.loads(data.read_text())[:n_cases]
    if len(records) < n_cases:
        raise SystemExit(f"{data} has {len(records)} records")
    ids = [str(r["case_id"]) for r in records]
    runs = out / "runs"
    dirs = sorted(runs.iterdir()) if runs.is_dir() else []  # made by an earlier call
    for k, (method, hparams, preset) in enumerate([] if dirs else _arms(n_arms)):
        rid = f"counterfact_{method}_{k}"
        d = make_run(runs, method, 0, case_ids=ids, data_sha=sha, hparams=hparams,
                     preset=preset, run_id=rid, rho_shift=0.01 * k, margin_gain=0.1 * k,
                     curve=True, diagnostics=method not in ("noop", "ft"))
        m = json.loads((d / "manifest.json").read_text())
        m["data"]["path"] = str(data)
        (d / "manifest.json").write_text(json.dumps(m))
        rng = np.random.default_rng(k)
        lines = []
        for line, rec in zip((d / "records.jsonl").read_text().splitlines(), records,
                             strict=True):
            r = json.loads(line)
            new, true = rec["target_new"], rec["ground_truth"]
            ans = {"efficacy": [_answer(rng, bool(r.get("efficacy_success")), new, true)],
                   "paraphrase": [_answer(rng, bool(r.get("paraphrase_success")), new, true)],
                   "neighborhood": [_answer(rng, rng.uniform() < 0.7, rec[
                       "locality_ground_truth"], new)]}
            refs = {"efficacy": new, "paraphrase": new,
                    "neighborhood": rec["locality_ground_truth"]}
            r["answers"] = ans
            for g, (a,) in ans.items():
                r[f"gen_{g}_em"] = r[f"gen_{g}_f1"] = float(a == refs[g])
            lines.append(json.dumps(r))
        (d / "records.jsonl").write_text("\n".join(lines) + "\n")
        dirs.append(d)
    t = time.perf_counter()
    build_report(dirs, out / "report", n_resamples=n_resamples)
    print(f"built {out / 'report'} in {time.perf_counter() - t:.0f} s")
    return out / "report" / "index.html"


MEASURE = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const root = document.getElementById("explorer");
  const form = document.getElementById("ex-form");
  const status = document.getElementById("ex-status");
  const out = {dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd,
               ready: Number(root.dataset.readyMs), decode: Number(root.dataset.decodeMs)};
  const arm = document.getElementById("ex-rule1-arm");
  arm.value = arm.options[arm.options.length - 1].value;
  document.getElementById("ex-rule1-cond").value = "eq100";
  let t = performance.now();
  arm.dispatchEvent(new Event("change"));
  out.filter = performance.now() - t;
  out.filtered = status.textContent;
  document.getElementById("ex-clear").click();
  const sort = document.getElementById("ex-sort");
  sort.value = sort.options[Math.min(sort.options.length - 1, 7)].value;
  t = performance.now();
  sort.dispatchEvent(new Event("change"));
  out.sort = performance.now() - t;
  document.getElementById("ex-text").value = "english";
  t = performance.now();
  form.dispatchEvent(new Event("submit", {cancelable: true}));
  out.search = performance.now() - t;
  out.searched = status.textContent;
  out.heap = performance.memory ? performance.memory.usedJSHeapSize / 2 ** 20 : null;
  return out;
}"""


def measure(paths: list[Path], executable: str, repeat: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    args=["--no-sandbox", "--enable-precise-memory-info"])
        for path in paths:
            text = path.read_text(encoding="utf-8")
            data = re.search(r'id="case-data">([^<]*)<', text)
            runs = []
            for _ in range(repeat):
                tab = browser.new_page(viewport={"width": 1280, "height": 900})
                problems: list[str] = []
                tab.on("pageerror", lambda e, problems=problems: problems.append(str(e)))
                tab.on("console", lambda m, problems=problems: problems.append(m.text)
                       if m.type == "error" else None)
                tab.goto(path.resolve().as_uri())
                tab.wait_for_selector("#explorer[data-ready='1']", timeout=600_000)
                runs.append(tab.evaluate(MEASURE))
                tab.close()
                if problems:
                    raise SystemExit(f"{path}: {problems}")

            def med(key: str, runs: list[dict] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            raw = len(gzip.decompress(base64.b64decode(data.group(1)))) if data else 0
            print(f"{path}: {path.stat().st_size / 2**20:.2f} MiB (explorer data "
                  f"{len(data.group(1)) / 2**20 if data else 0:.2f} MiB base64 gzip, "
                  f"{raw / 2**20:.1f} MiB as JSON); "
                  f"median of {repeat}: DOMContentLoaded {med('dcl'):.0f} ms, load "
                  f"{med('load'):.0f} ms, explorer ready {med('ready'):.0f} ms (decode + first "
                  f"page {med('decode'):.0f} ms); filter (last method's Eff = 100%) "
                  f"{med('filter'):.0f} ms "
                  f"({runs[0]['filtered']}), order by a margin {med('sort'):.0f} ms, first "
                  f"text search {med('search'):.0f} ms ({runs[0]['searched']}); JS heap "
                  f"{med('heap') if runs[0]['heap'] is not None else float('nan'):.0f} MiB")
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--cases", type=int, default=100)
    b.add_argument("--arms", type=int, default=14)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--n-resamples", type=int, default=200)
    m = sub.add_parser("measure")
    m.add_argument("pages", nargs="+", type=Path)
    m.add_argument("--executable", default="/usr/bin/chromium")
    m.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.command == "build":
        build(args.cases, args.arms, args.out, args.n_resamples)
    else:
        measure(args.pages, args.executable, args.repeat)


if __name__ == "__main__":
    main()
