"""Record the ORIGINAL ROME/MEMIT/AlphaEdit on SmolLM2 for the parity test (issue 13, item 3).

Usage (from the repository root)::

    python tools/parity/run_original.py --checkout /path/to/AlphaEdit \\
        --out tests/fixtures/parity [--n-cases 10] [--batch-size 5] [--c0 harness]

``--checkout`` is a clone of github.com/jianghoucheng/AlphaEdit (its ``rome/``, ``memit/`` and
``AlphaEdit/`` are the code that produced the issue's reference numbers). Nothing of it is
copied here: the checkout is imported from its path and adapted at run time
(:mod:`tools.parity.shims`; every adaptation is written into the fixture).

What runs (the experiment loop of the checkout's ``experiments/evaluate.py``, which cannot be
imported today: it needs ``higher``, ``omegaconf`` and ``datasets.load_metric``; this script
repeats its few lines for the three methods):

* ROME: ``apply_rome_to_model`` one request at a time, sequentially (evaluate.py never restores
  the weights between chunks), ``--n-cases`` requests.
* MEMIT: ``apply_memit_to_model`` on chunks of ``--batch-size``, sequentially.
* AlphaEdit: ``apply_AlphaEdit_to_model`` on the same chunks, carrying ``cache_c`` and the
  null-space projectors ``P`` (computed as evaluate.py's ``get_project``: SVD of C0, the
  left singular vectors whose singular value is below ``nullspace_threshold``).
* After all edits of a method: ``compute_rewrite_quality_counterfact`` for every case
  (generation tests off), as evaluate.py does.

Injected into the original (the same values are given to the harness by the test):

* context templates, generated once with the original's ``generate_fast`` (seeded) and put
  into the ``CONTEXT_TEMPLATES_CACHE`` of ``rome.rome_main``, ``memit.memit_main`` and
  ``AlphaEdit.AlphaEdit_main``;
* C0 per layer: ``layer_stats`` in ``memit.memit_main``, ``AlphaEdit.AlphaEdit_main`` and
  ``rome.compute_u`` is replaced by a function returning the injected matrix
  (``--c0 harness``: the harness's records-mode C0; ``--c0 original``: the original's own
  ``layer_stats`` on the same records). The original's own C0 on those records is always
  computed and summarised in the fixture.

Recorded per case (``fixture.safetensors`` for vectors, ``fixture.json`` for the rest): keys
per edited layer (MEMIT/AlphaEdit: ``compute_ks`` output of the write loop; AlphaEdit also the
keys it adds to ``cache_c``; ROME: the template-averaged key of ``compute_u`` and the plain
prompt's key of ``compute_v``), the target z (MEMIT/AlphaEdit: ``compute_z``; ROME: the MLP
output target of ``compute_v``, recovered as ``right * (k_plain . u) + mlp_out``), and the
mean per-token log-probabilities of target_new/target_true on the rewrite, paraphrase and
neighbourhood prompts before and after editing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.parity import shims  # noqa: E402

D_SKETCH = 4  # columns of the random sketch C0 @ R stored per layer
SKETCH_SEED = 0
ROUND = 7  # significant digits of floats written to JSON


def _sig(x: float) -> float:
    return float(f"{x:.{ROUND}g}")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def counterfact_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` KnowEdit CounterFact records in the original's record format: the prompt
    becomes a template (first occurrence of the subject -> ``{}``), ground_truth is target_true,
    rephrase_prompt the one paraphrase, locality_prompt the one neighbourhood prompt."""
    raw = json.loads(path.read_text())[:n]
    out = []
    for rec in raw:
        prompt, subject = rec["prompt"], rec["subject"]
        at = prompt.index(subject)
        if "{" in prompt or "}" in prompt:
            raise SystemExit(f"case {rec['case_id']}: braces in the prompt are not handled")
        if rec["locality_ground_truth"] != rec["ground_truth"]:
            raise SystemExit(f"case {rec['case_id']}: locality_ground_truth differs from "
                             "ground_truth; the original scores neighbours against target_true")
        out.append({
            "case_id": rec["case_id"],
            "requested_rewrite": {
                "prompt": prompt[:at] + "{}" + prompt[at + len(subject):],
                "subject": subject,
                "target_new": {"str": rec["target_new"]},
                "target_true": {"str": rec["ground_truth"]},
            },
            "paraphrase_prompts": [rec["rephrase_prompt"]],
            "neighborhood_prompts": [rec["locality_prompt"]],
            "generation_prompts": [],
        })
    return out


def corpus_lines(path: Path) -> list[str]:
    """Non-blank lines of a WikiText file, each ending in a newline: the rows of Hugging
    Face's ``wikitext`` that carry text (the original's ``mom2_dataset: wikitext``)."""
    with open(path, encoding="utf-8-sig") as f:
        return [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]


def converted_smollm2() -> Path:
    """The harness's dequantised SmolLM2 (``$KEH_CACHE/models/<gguf sha256>``); run any
    ``keh run --model smollm2-135m`` once to create it."""
    from harness.models import cache_dir

    for done in sorted((cache_dir() / "models").glob("*/.complete")):
        if "smollm2" in json.loads(done.read_text()).get("gguf", "").lower():
            return done.parent
    raise SystemExit("no converted SmolLM2 under the harness cache; run `keh run --model "
                     "smollm2-135m --method noop --n-edits 1` once or pass --model-dir")


def harness_hparams(method: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "methods" / "hparams" / method / "smollm2-135m.yaml")
                          .read_text())


def original_hparams(root: Path, n_layers: int, rome_layer: int, n_records: int
                     ) -> dict[str, Any]:
    """The original's Llama-3-8B JSONs with the SmolLM2 adaptations: ``v_loss_layer`` = last
    layer, ROME's layer from the harness's faithful file, ``mom2_n_samples`` = records used."""
    from AlphaEdit import AlphaEditHyperParams
    from memit import MEMITHyperParams
    from rome import ROMEHyperParams

    out = {}
    for name, cls, fname in (("rome", ROMEHyperParams, "ROME"),
                             ("memit", MEMITHyperParams, "MEMIT"),
                             ("alphaedit", AlphaEditHyperParams, "AlphaEdit")):
        file = json.loads((root / "hparams" / fname / "Llama3-8B.json").read_text())
        changed = {"v_loss_layer": n_layers - 1, "mom2_n_samples": n_records}
        if name == "rome":
            changed["layers"] = [rome_layer]
        out[name] = {"cls": cls, "data": {**file, **changed}, "changed": changed,
                     "file": file}
    return out


# ---------------------------------------------------------------------------------------------
# C0
# ---------------------------------------------------------------------------------------------


def original_c0(model, tok, layers: list[int], lines: list[str], n_records: int,
                rewrite_tmp: str, stats_dir: str | None = None
                ) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """The original's ``layer_stats`` (mom2, float32, ``sample_size=n_records``, its fixed
    random subset with seed 1) on ``lines`` given as the ``train`` split of ``wikitext``;
    cached by ``layer_stats`` itself in ``stats_dir`` when given (else a temporary dir)."""
    import datasets
    import rome.layer_stats as ls

    saved = ls.load_dataset
    ls.load_dataset = lambda *a, **k: {"train": datasets.Dataset.from_dict({"text": lines})}
    C0, counts = {}, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for layer in layers:
                stat = ls.layer_stats(model, tok, rewrite_tmp.format(layer), stats_dir or tmp,
                                      "wikitext",
                                      to_collect=["mom2"], sample_size=n_records,
                                      precision="float32",
                                      progress=lambda x, total=None: x)
                C0[layer] = stat.mom2.moment().float().cpu()
                counts[layer] = int(stat.mom2.count)
    finally:
        ls.load_dataset = saved
    return C0, counts


def harness_c0(model_dir: Path, layers: list[int], corpus: Path, n_records: int,
               unit: str) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """The harness's records-mode C0 (``stats_sampling``) for ``layers``."""
    from harness.models import load_model
    from harness.stats import second_moment_stats

    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    if Path(lm.model.config._name_or_path).resolve() != model_dir:
        raise SystemExit(f"--c0 harness: the harness's smollm2-135m is "
                         f"{lm.model.config._name_or_path}, not --model-dir {model_dir}")
    res = second_moment_stats(lm, layers, str(corpus), sampling=unit, n_records=n_records)
    C0 = {layer: res.C0[layer].float().cpu() for layer in layers}
    del lm
    return C0, res.provenance()


def c0_summary(C: torch.Tensor) -> dict[str, Any]:
    C = C.double()
    return {"trace": _sig(float(C.trace())), "fro": _sig(float(C.norm())),
            "block8": [[_sig(float(v)) for v in row] for row in C[:8, :8].tolist()]}


def sketch_matrix(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SKETCH_SEED)
    return torch.randn(d, D_SKETCH, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Recording wrappers (set on the original's module namespaces for one method run)
# ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, t: torch.Tensor) -> None:
        if name in self.tensors:
            raise RuntimeError(f"recorded twice: {name}")
        self.tensors[name] = t.detach().float().cpu().contiguous().clone()


def patch(module: Any, name: str, value: Any, undo: list) -> None:
    undo.append((module, name, getattr(module, name)))
    setattr(module, name, value)


def unpatch(undo: list) -> None:
    for module, name, value in reversed(undo):
        setattr(module, name, value)
    undo.clear()


def record_locate(main: Any, prefix: str, rec: Recorder, undo: list) -> dict[str, Any]:
    """Wrap ``compute_z`` and ``compute_ks`` of a MEMIT-style main module."""
    ctx: dict[str, Any] = {"requests": None, "seen": set()}
    orig_z, orig_ks = main.compute_z, main.compute_ks

    def compute_z(model, tok, request, hparams, layer, templates):
        z = orig_z(model, tok, request, hparams, layer, templates)
        rec.put(f"{prefix}/z/{request['case_id']}", z)
        return z

    def compute_ks(model, tok, requests, hparams, layer, templates):
        ks = orig_ks(model, tok, requests, hparams, layer, templates)
        ids = tuple(r["case_id"] for r in requests)
        kind = "key" if (ids, layer) not in ctx["seen"] else "cache_key"
        ctx["seen"].add((ids, layer))
        for r, k in zip(requests, ks, strict=True):
            rec.put(f"{prefix}/{kind}/{layer}/{r['case_id']}", k)
        return ks

    patch(main, "compute_z", compute_z, undo)
    patch(main, "compute_ks", compute_ks, undo)
    return ctx


def record_rome(rec: Recorder, undo: list) -> None:
    import rome.compute_u as cu
    import rome.compute_v as cv
    import rome.rome_main as rm

    orig_u, orig_v = rm.compute_u, rm.compute_v
    orig_io = cv.get_module_input_output_at_word
    state: dict[str, Any] = {}

    def compute_u(model, tok, request, hparams, layer, templates):
        inner = cu.repr_tools.get_reprs_at_word_tokens

        def reprs(*a, **k):
            r = inner(*a, **k)
            state["key"] = r.mean(0)
            return r

        cu.repr_tools.get_reprs_at_word_tokens = reprs
        try:
            u = orig_u(model, tok, request, hparams, layer, templates)
        finally:
            cu.repr_tools.get_reprs_at_word_tokens = inner
        rec.put(f"rome/key/{request['case_id']}", state.pop("key"))
        return u

    def io(*a, **k):
        cur_in, cur_out = orig_io(*a, **k)
        state["io"] = (cur_in, cur_out)
        return cur_in, cur_out

    def compute_v(model, tok, request, hparams, layer, left, templates):
        right = orig_v(model, tok, request, hparams, layer, left, templates)
        cur_in, cur_out = state.pop("io")
        cid = request["case_id"]
        rec.put(f"rome/k_plain/{cid}", cur_in)
        rec.put(f"rome/z/{cid}", right * torch.dot(cur_in, left) + cur_out)
        return right

    patch(rm, "compute_u", compute_u, undo)
    patch(rm, "compute_v", compute_v, undo)
    patch(cv, "get_module_input_output_at_word", io, undo)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def evaluate(model, tok, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The original's ``compute_rewrite_quality_counterfact`` (no generation tests); its NLLs
    are turned into mean per-token log-probabilities (sign flipped)."""
    from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact

    out = []
    for record in records:
        m = compute_rewrite_quality_counterfact(model, tok, record, None, None)
        row: dict[str, Any] = {"case_id": record["case_id"]}
        for group in ("rewrite", "paraphrase", "neighborhood"):
            probs = m[f"{group}_prompts_probs"]
            row[group] = {"new": [_sig(-p["target_new"]) for p in probs],
                          "true": [_sig(-p["target_true"]) for p in probs]}
            row[f"{group}_correct"] = [bool(c) for c in m[f"{group}_prompts_correct"]]
        out.append(row)
    return out


def log(msg: str) -> None:
    print(f"[parity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def chunks(seq: list, n: int) -> list[list]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def run_method(name: str, model, tok, records, hp_info, batch_size: int, templates,
               C0: dict[int, torch.Tensor], rec: Recorder, rome_call: str = "single"
               ) -> dict[str, Any]:
    import AlphaEdit.AlphaEdit_main as am
    import memit.memit_main as mm
    import rome.compute_u as cu
    import rome.rome_main as rm

    undo: list = []
    names = {hp_info["data"]["rewrite_module_tmp"].format(layer): C for layer, C in C0.items()}

    def injected_layer_stats(model, tok, layer_name, *a, **k):
        C = names[layer_name].clone()
        return SimpleNamespace(mom2=SimpleNamespace(moment=lambda: C))

    for mod in (am, mm, cu):
        patch(mod, "layer_stats", injected_layer_stats, undo)
    am.COV_CACHE.clear()
    mm.COV_CACHE.clear()
    cu.inv_mom2_cache.clear()
    patch(rm, "CONTEXT_TEMPLATES_CACHE", list(templates["rome"]), undo)
    patch(mm, "CONTEXT_TEMPLATES_CACHE", [list(t) for t in templates["memit"]], undo)
    patch(am, "CONTEXT_TEMPLATES_CACHE", [list(t) for t in templates["memit"]], undo)

    hp = hp_info["cls"](**hp_info["data"])
    requests = [{"case_id": r["case_id"], **r["requested_rewrite"]} for r in records]
    t0 = time.perf_counter()
    try:
        if name == "rome":
            record_rome(rec, undo)
            # "single": one request per call (every case edited); "chunk": the chunk of
            # ``batch_size`` per call, as evaluate.py passes it (the checkout's
            # apply_rome_to_model then edits only request[0] of each chunk)
            order = [[r] for r in requests] if rome_call == "single" \
                else chunks(requests, batch_size)
            for batch in order:
                rm.apply_rome_to_model(model, tok, batch, hp, return_orig_weights=False,
                                       cache_template=None)
        elif name == "memit":
            record_locate(mm, "memit", rec, undo)
            order = chunks(requests, batch_size)
            for batch in order:
                mm.apply_memit_to_model(model, tok, batch, hp, return_orig_weights=False,
                                        cache_template=None)
        else:
            record_locate(am, "alphaedit", rec, undo)
            order = chunks(requests, batch_size)
            W = model.get_submodule(hp.rewrite_module_tmp.format(hp.layers[-1])).weight
            d = W.shape[1]
            cache_c = torch.zeros((len(hp.layers), d, d))
            P = torch.zeros((len(hp.layers), d, d))
            for i, layer in enumerate(hp.layers):  # evaluate.py's get_project
                cov = am.get_cov(model, tok, hp.rewrite_module_tmp.format(layer),
                                 hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype).cpu()
                U, S, _ = torch.linalg.svd(cov, full_matrices=False)
                small = (S < hp.nullspace_threshold).nonzero(as_tuple=True)[0]
                P[i] = U[:, small] @ U[:, small].T
                rec.put(f"alphaedit/projector_rank/{layer}",
                        torch.tensor([float(len(small))]))
            for batch in order:
                model, cache_c = am.apply_AlphaEdit_to_model(
                    model, tok, batch, hp, cache_template=None, cache_c=cache_c, P=P)
        edit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        post = evaluate(model, tok, records)
        eval_s = time.perf_counter() - t1
    finally:
        unpatch(undo)
    return {"batches": [[r["case_id"] for r in b] for b in order], "sequential": True,
            "rome_call": rome_call if name == "rome" else None,
            "post": post, "edit_s": round(edit_s, 1), "eval_s": round(eval_s, 1)}


def make_templates(model, tok, seed: int, rome_lengths: list[list[int]]) -> dict[str, Any]:
    """Context templates by the original's ``generate_fast`` (top-k 5 sampling), seeded:
    MEMIT/AlphaEdit as ``memit_main.get_context_templates`` ([(10, 5)]: 5 texts of 10 tokens
    in total, braces -> spaces), ROME as ``rome_main.get_context_templates`` with its
    ``context_template_length_params`` (braces removed)."""
    from util.generate import generate_fast

    starters = ["The", "Therefore", "Because", "I", "You"]
    torch.manual_seed(seed)
    memit = [["{}"], [f.replace("{", " ").replace("}", " ") + ". {}"
                      for f in generate_fast(model, tok, starters, n_gen_per_prompt=1,
                                             max_out_len=10)]]
    rome = ["{}"]
    for length, n_gen in rome_lengths:
        rome += [x.replace("{", "").replace("}", "") + ". {}"
                 for x in generate_fast(model, tok, starters, n_gen_per_prompt=n_gen // 5,
                                        max_out_len=length)]
    return {"memit": memit, "rome": rome, "seed": seed,
            "how": "util.generate.generate_fast after torch.manual_seed(seed); MEMIT/AlphaEdit "
                   "first, then ROME's length schedule in order"}


def versions() -> dict[str, str]:
    import numpy
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__,
           "platform": platform.platform()}
    try:
        import datasets

        out["datasets"] = datasets.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def git_rev(root: Path) -> str | None:
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (root / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", required=True, help="clone of jianghoucheng/AlphaEdit")
    ap.add_argument("--model-dir", default=None,
                    help="HF directory of SmolLM2 (default: the harness's converted copy)")
    ap.add_argument("--data", default=None, help="KnowEdit counterfact-edit.json "
                    "(default: $KEH_DATA_DIR/counterfact/counterfact-edit.json)")
    ap.add_argument("--corpus", default=None,
                    help="WikiText file (default: $KEH_DATA_DIR/wikitext-2/valid.txt)")
    ap.add_argument("--n-cases", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--stats-records", type=int, default=200)
    ap.add_argument("--stats-unit", default="lines", choices=["lines", "records"])
    ap.add_argument("--c0", default="harness", choices=["harness", "original"],
                    help="which C0 is injected into the original")
    ap.add_argument("--rome-layer", type=int, default=None,
                    help="default: the layer of methods/hparams/rome/smollm2-135m.yaml")
    ap.add_argument("--template-seed", type=int, default=0)
    ap.add_argument("--rome-call", default="single", choices=["single", "chunk"],
                    help="ROME: one request per apply_rome_to_model call (default), or the "
                         "chunk of --batch-size per call as the checkout's evaluate.py does "
                         "(its apply_rome_to_model edits only the chunk's first request)")
    ap.add_argument("--methods", default="rome,memit,alphaedit")
    ap.add_argument("--original-stats-dir", default=None,
                    help="where the original's layer_stats caches its C0 (default: a temp dir)")
    ap.add_argument("--smoke-steps", type=int, default=None,
                    help="v_num_grad_steps for every method instead of the files' 25 (CPU "
                         "time; recorded as a change, the test applies it to the harness too)")
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "parity"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    data_dir = Path(os.environ.get("KEH_DATA_DIR", REPO.parent / "shared" / "data"))
    data = Path(args.data or data_dir / "counterfact" / "counterfact-edit.json").resolve()
    corpus = Path(args.corpus or data_dir / "wikitext-2" / "valid.txt").resolve()
    out_dir = Path(args.out).resolve()
    model_dir = Path(args.model_dir).resolve() if args.model_dir else converted_smollm2()
    rome_layer = args.rome_layer
    if rome_layer is None:
        rome_layer = int(harness_hparams("rome")["layers"][0])

    records = counterfact_records(data, args.n_cases)
    lines = corpus_lines(corpus)

    c0_layers = [4, 5, 6, 7, 8]  # MEMIT/AlphaEdit layers of the Llama-3-8B files (checked below)
    C_inj: dict[int, torch.Tensor] = {}
    prov: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if args.c0 == "harness":  # before the CPU shim (a model loaded under it is wrong)
        log("harness C0")
        t0 = time.perf_counter()
        C_inj, prov = harness_c0(model_dir, c0_layers, corpus, args.stats_records,
                                 args.stats_unit)
        timings["c0_harness_s"] = round(time.perf_counter() - t0, 1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # load BEFORE the CPU shim: loading under the patched torch factories gave a model whose
    # padded forwards return NaN (and degenerate sampled text)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    root = shims.install(args.checkout)
    tok.pad_token = tok.eos_token  # as evaluate.py
    torch.set_grad_enabled(True)
    weights0 = copy.deepcopy(model.state_dict())
    n_layers = model.config.num_hidden_layers
    hps = original_hparams(root, n_layers, rome_layer, args.stats_records)
    if args.smoke_steps is not None:
        for h in hps.values():
            h["data"]["v_num_grad_steps"] = h["changed"]["v_num_grad_steps"] = args.smoke_steps
    if sorted({*hps["memit"]["data"]["layers"], *hps["alphaedit"]["data"]["layers"]}) \
            != c0_layers:
        raise SystemExit(f"the checkout's MEMIT/AlphaEdit layers are not {c0_layers}")
    rewrite_tmp = hps["memit"]["data"]["rewrite_module_tmp"]

    log("templates")
    t0 = time.perf_counter()
    templates = make_templates(model, tok, args.template_seed,
                               hps["rome"]["data"]["context_template_length_params"])
    timings["templates_s"] = round(time.perf_counter() - t0, 1)

    log("original C0")
    t0 = time.perf_counter()
    C_orig, counts = original_c0(model, tok, c0_layers, lines, args.stats_records, rewrite_tmp,
                                 args.original_stats_dir)
    timings["c0_original_s"] = round(time.perf_counter() - t0, 1)
    rec = Recorder()
    R = sketch_matrix(next(iter(C_orig.values())).shape[0])
    c0_info: dict[str, Any] = {"records": args.stats_records, "unit": args.stats_unit,
                               "corpus": corpus.name, "corpus_sha256": sha256_file(corpus),
                               "n_lines": len(lines), "sketch": f"C0 @ randn({R.shape[0]}, "
                               f"{D_SKETCH}, generator seed {SKETCH_SEED}, float64)",
                               "original": {}, "harness": {}}
    for layer, C in C_orig.items():
        c0_info["original"][str(layer)] = {**c0_summary(C), "count": counts[layer]}
        rec.put(f"c0/original/sketch/{layer}", C.double() @ R)
    if args.c0 == "harness":
        for layer, C in C_inj.items():
            c0_info["harness"][str(layer)] = c0_summary(C)
            rec.put(f"c0/harness/sketch/{layer}", C.double() @ R)
        c0_info["harness_provenance"] = prov
    else:
        C_inj = C_orig
    c0_info["injected"] = args.c0

    model.load_state_dict(weights0)
    log("pre-edit evaluation")
    t0 = time.perf_counter()
    pre = evaluate(model, tok, records)
    timings["eval_pre_s"] = round(time.perf_counter() - t0, 1)

    runs = {}
    for name in args.methods.split(","):
        model.load_state_dict(weights0)
        log(name)
        t0 = time.perf_counter()
        runs[name] = run_method(name, model, tok, records, hps[name], args.batch_size,
                                templates, C_inj, rec, args.rome_call)
        timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        runs[name]["hparams"] = hps[name]["data"]
        runs[name]["hparams_changed_from_llama3_8b"] = hps[name]["changed"]
        runs[name]["hparams_file_llama3_8b"] = hps[name]["file"]
    timings["total_s"] = round(time.perf_counter() - t_start, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(dict(sorted(rec.tensors.items())), str(out_dir / "fixture.safetensors"),
              metadata={"what": "vectors of the original ROME/MEMIT/AlphaEdit run, see "
                                "fixture.json"})
    cmd = "python tools/parity/run_original.py " + " ".join(shlex.quote(a) for a in argv)
    fixture = {
        "command": cmd,
        "checkout": {"path": str(root), "commit": git_rev(root)},
        "model": {"dir": str(model_dir), "weights_sha256": sha256_file(
            model_dir / "model.safetensors"), "n_layers": n_layers, "dtype": "float32",
            "device": "cpu"},
        "data": {"file": data.name, "sha256": sha256_file(data),
                 "case_ids": [r["case_id"] for r in records], "records": records},
        "versions": versions(),
        "adaptations": {**shims.ADAPTATIONS, **ADAPTATIONS},
        "templates": templates,
        "c0": c0_info,
        "pre": pre,
        "runs": runs,
        "timings": timings,
        "tensors": "fixture.safetensors: <method>/key/<layer>/<case> (MEMIT/AlphaEdit write "
                   "keys), alphaedit/cache_key/<layer>/<case> (keys added to cache_c), "
                   "<method>/z/<case>, rome/key/<case> (template-averaged), rome/k_plain/<case>"
                   ", c0/{original,harness}/sketch/<layer>, alphaedit/projector_rank/<layer>",
    }
    (out_dir / "fixture.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(json.dumps(timings))


#: adaptations made by this script (beside :data:`shims.ADAPTATIONS`)
ADAPTATIONS = {
    "model": "SmolLM2 loaded with AutoModelForCausalLM.from_pretrained(<harness's converted "
             "dir>, dtype=float32) on CPU; tok.pad_token = tok.eos_token as evaluate.py",
    "hparams": "hparams/{ROME,MEMIT,AlphaEdit}/Llama3-8B.json with v_loss_layer = 29 (last "
               "layer of SmolLM2), ROME layers = [harness faithful ROME layer], "
               "mom2_n_samples = records used (C0 is injected, so it only names the count)",
    "data": "KnowEdit counterfact-edit.json mapped to the original record format (prompt -> "
            "template at the subject's first occurrence, ground_truth -> target_true, "
            "rephrase_prompt/locality_prompt -> one paraphrase/neighbourhood prompt); no "
            "generation prompts, attribute snippets or tf-idf (generation tests off)",
    "loop": "experiments/evaluate.py cannot be imported (higher, omegaconf, "
            "datasets.load_metric); its loop (chunks, sequential, AlphaEdit's cache_c and P "
            "from get_project's SVD rule) is repeated in run_original.py",
    "templates": "context templates generated once by util.generate.generate_fast (seeded) "
                 "and injected into the CONTEXT_TEMPLATES_CACHE of rome_main, memit_main and "
                 "AlphaEdit_main",
    "c0": "layer_stats replaced in memit_main, AlphaEdit_main and rome.compute_u by a "
          "function returning the injected C0; the original's own C0 comes from "
          "rome.layer_stats.layer_stats with load_dataset patched to return the corpus lines "
          "as the 'train' split of 'wikitext'",
    "recording": "compute_z/compute_ks of memit_main and AlphaEdit_main and compute_u/compute_v "
                 "of rome_main wrapped to record their inputs/outputs (values unchanged)",
}


if __name__ == "__main__":
    main()
