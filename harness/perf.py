"""``nox -s perf``: time every phase of an edit-and-evaluate job and compare it with the
practical limit, a plain forward pass measured in the same process.

Phases: key statistics (tokens/s, one pass for all edited layers), null-space projection
(eigendecomposition per layer), one batch of each method split into target step, MetaKE's outer
loop, solve+write and diagnostics, CounterFact evaluation (cases/s and tokens/s) and, where
lm-eval is installed, downstream (examples/s); peak memory. Writes ``perf.json`` and
``perf.md`` (a table with each throughput as a fraction of the forward-pass limit).

    python -m harness.perf --model smollm2-135m --out perf_out
    python -m harness.perf --model random:llama3-8b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError
from harness.loop import restore_weights, snapshot_weights
from harness.models import load_model
from harness.records import device_description, package_versions, peak_memory


def _sync(lm: Any) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def _timed(lm: Any, fn: Any) -> tuple[Any, float]:
    _sync(lm)
    t0 = time.perf_counter()
    out = fn()
    _sync(lm)
    return out, time.perf_counter() - t0


def measure(model: str, device: str, dtype: str, methods: list[str], n_cases: int,
            batch_size: int | list[int], stats_tokens: int, data: str | None
            ) -> dict[str, Any]:
    """``batch_size``: one size, or several: each method is then timed on one batch of each
    (phases ``edit:<method>@<size>``; the target: time per edit at 100 no worse than
    at 10)."""
    from methods import get_method
    from methods.base import load_hparams
    from methods.solvers import nullspace_projector
    from suites import counterfact
    from suites.data import find_data_file

    lm = load_model(model, device=device, dtype=dtype)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    path = find_data_file("counterfact", counterfact.DEFAULT_FILES, counterfact.CANONICAL_URL,
                          explicit=data)
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    requests = counterfact.load(path)[:max(n_cases, *sizes)]
    report: dict[str, Any] = {"model": model, "dtype": str(lm.dtype),
                              "device": device_description(lm.device),
                              "versions": package_versions(), "phases": {}}
    ph = report["phases"]

    # --- statistics vs forward limit -------------------------------------------------------
    hp0, _ = load_hparams(get_method("alphaedit").Hparams, "alphaedit", model)
    layers = [layer for layer in hp0.layers if layer < lm.n_layers] or [0]
    from harness.stats import benchmark_stats, second_moment_stats

    bench = benchmark_stats(lm, layers, n_tokens=stats_tokens)
    limit = bench["forward_tok_s"]
    report["forward_tok_s"] = limit
    ph["stats"] = {"tok_s": bench["stats_tok_s"], "fraction_of_limit": bench["ratio"],
                   "layers": layers, "tokens": bench["n_tokens"]}
    res, _ = _timed(lm, lambda: second_moment_stats(lm, layers, None, stats_tokens,
                                                    show_progress=False))
    _, t_proj = _timed(lm, lambda: [nullspace_projector(res.C0[layer]) for layer in layers])
    ph["nullspace_projection"] = {"s_per_layer": t_proj / len(layers)}

    # --- one batch per method (and size) -------------------------------------------------------
    for name, size in ((m, b) for m in methods for b in sizes):
        batch = requests[:size]
        mod = get_method(name)
        hp, _ = load_hparams(mod.Hparams, name, model)
        if hasattr(hp, "stats_tokens"):
            hp.stats_tokens = stats_tokens
        if getattr(hp, "layers", None):  # a file's layers beyond a smaller model's depth
            hp.layers = [layer for layer in hp.layers if layer < lm.n_layers] or [0]
        snap = snapshot_weights(lm, hp)
        outcome, total = _timed(lm, lambda mod=mod, hp=hp, batch=batch: mod.edit(lm, batch, hp,
                                                                              {}))
        restore_weights(lm, hp, snap)
        key = f"edit:{name}" if len(sizes) == 1 else f"edit:{name}@{size}"
        ph[key] = {"s_per_edit": total / len(batch), "batch": len(batch),
                   **{k: v / len(batch) for k, v in outcome.timings.items()}}
    if "alphaedit" in methods and "metake" in methods and len(sizes) == 1:
        report["metake_overhead"] = (ph["edit:metake"]["s_per_edit"]
                                     / ph["edit:alphaedit"]["s_per_edit"])

    # --- evaluation ----------------------------------------------------------------------------
    from harness.scoring import encode_pair

    cases = requests[:n_cases]
    counterfact.evaluate(lm, cases[:2])  # warm-up
    _, t_eval = _timed(lm, lambda: counterfact.evaluate(lm, cases))
    n_tok = 0
    for r in cases:
        for p in [r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts]:
            for t in (r.target_new, r.target_true):
                a, b = encode_pair(lm.tokenizer, p, t)
                n_tok += len(a) + len(b)
    ph["evaluate"] = {"cases_per_s": len(cases) / t_eval, "tok_s": n_tok / t_eval,
                      "fraction_of_limit": n_tok / t_eval / limit}
    try:
        from harness.paths import data_dir
        from suites.downstream import evaluate_downstream  # needs lm-eval

        _, t_ds = _timed(lm, lambda: evaluate_downstream(lm, ["sst2"], data_dir(), limit=64))
        ph["downstream"] = {"examples_per_s": 64 / t_ds}
    except ImportError as exc:
        ph["downstream"] = {"skipped": f"lm-eval not installed ({exc})"}
    except Exception as exc:  # report, don't hide: downstream needs the data dir
        ph["downstream"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    report["peak_memory"] = peak_memory(lm.device)
    return report


def to_markdown(report: dict[str, Any]) -> str:
    lim = report["forward_tok_s"]
    lines = [f"# Performance: {report['model']} ({report['dtype']}, "
             f"{report['device'].get('gpu', report['device']['device'])})", "",
             f"Forward-pass limit: {lim:,.0f} tokens/s", "",
             "| phase | measure | fraction of forward limit |", "|---|---|---|"]
    for name, ph in report["phases"].items():
        if "tok_s" in ph:
            lines.append(f"| {name} | {ph['tok_s']:,.0f} tokens/s"
                         + (f" ({ph['cases_per_s']:.1f} cases/s)" if "cases_per_s" in ph
                            else "") + f" | {ph['fraction_of_limit']:.2f} |")
        elif "s_per_edit" in ph:
            parts = ", ".join(f"{k} {v:.3f}s" for k, v in ph.items()
                              if k.endswith("_s") and k != "s_per_edit")
            lines.append(f"| {name} | {ph['s_per_edit']:.3f} s/edit ({parts}) | |")
        elif "s_per_layer" in ph:
            lines.append(f"| {name} | {ph['s_per_layer']:.3f} s/layer | |")
        elif "examples_per_s" in ph:
            lines.append(f"| {name} | {ph['examples_per_s']:.1f} examples/s | |")
        else:
            lines.append(f"| {name} | {ph.get('skipped', '')} | |")
    if "metake_overhead" in report:
        lines += ["", f"MetaKE time per edit / AlphaEdit's: {report['metake_overhead']:.2f}"]
    mem = report.get("peak_memory", {})
    lines += ["", "Peak memory: " + ", ".join(f"{k} {v:,.0f}" for k, v in mem.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.perf")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="rome,memit,alphaedit,metake")
    ap.add_argument("--n-cases", type=int, default=50)
    ap.add_argument("--batch-size", default="10",
                    help="edits per timed batch; several comma-separated sizes time each")
    ap.add_argument("--stats-tokens", type=int, default=50_000)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="perf_out")
    args = ap.parse_args(argv)
    try:
        report = measure(args.model, args.device, args.dtype, args.methods.split(","),
                         args.n_cases, [int(b) for b in args.batch_size.split(",")],
                         args.stats_tokens, args.data)
    except UserError as exc:
        print(f"keh: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.model.replace(":", "_").replace("/", "_") + f"_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    md = to_markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
