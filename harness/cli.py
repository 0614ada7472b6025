"""Command line of keh, the knowledge-editing harness (also ``python -m harness``).

``keh run`` edits a model and evaluates it, ``keh report`` turns run directories into tables,
figures and claim tests, ``keh compare`` gates a variant against its parent, ``keh list`` names
the methods, suites and models, ``keh data`` lists and fetches the data files. Bad input ends
with one line on stderr (``keh: error: ...``) and exit status 2, and so does a run stopped by
``--stop-on-error``. ``keh run --resume RUN_DIR`` continues a killed run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from harness.config import FLUENCY_DECODINGS, ZSRE_TARGETS, RunConfig
from harness.errors import UserError
from harness.helptext import HelpFormatter
from harness.yamlio import safe_load


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for number in (int, float):  # YAML 1.1 reads "1e-3" as a string
        try:
            return key.strip(), number(value)
        except ValueError:
            pass
    try:
        return key.strip(), safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: the value is not valid YAML ({problem}); quote lists in the "
            f"shell, e.g. --set 'layers=[4, 5]'") from exc


def _task_list(text: str) -> list[str]:
    """``--downstream sst2,mrpc`` -> ["sst2", "mrpc"]."""
    from suites.downstream import parse_tasks

    tasks = parse_tasks(text)
    if not tasks:
        raise argparse.ArgumentTypeError("--downstream expects task names, e.g. sst2,mrpc")
    return tasks


#: help formatter of every keh parser
HELP = HelpFormatter
DESCRIPTION = ("keh, a knowledge-editing harness: edit facts inside language models, evaluate "
               "the edits and compare methods (also: python -m harness).")
EPILOG = ("Every option: keh COMMAND --help. Grids, presets, the cluster launcher and the "
          "regression gate: docs/USAGE.md.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keh", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    sub.add_parser("list", help="list methods, suites and built-in models",
                   description="Print the registered methods, the suites and the model names "
                               "keh knows (built-in, published and random:<shape>) as JSON.")
    _add_report(sub)
    _add_compare(sub)
    _add_data(sub)
    return parser


def _add_run(sub: Any) -> None:
    d = RunConfig()
    r = sub.add_parser("run", help="edit a model and evaluate it on a suite",
                       formatter_class=HELP,
                       description="Edit a model with one method on the cases of one suite "
                                   "and evaluate it; writes one run directory under --out-dir.")
    r.add_argument("--model", default=d.model,
                   help="smollm2-135m | gemma3-270m | gpt2-xl | gpt-j-6b | llama3-8b | "
                        "random:<shape> | HF id | local dir (keh list)")
    r.add_argument("--method", default=d.method,
                   help="editing method (keh list; noop leaves the model unedited)")
    r.add_argument("--suite", default=d.suite, help="counterfact or zsre")
    r.add_argument("--n-edits", type=int, default=d.n_edits, help="cases to edit")
    r.add_argument("--start", type=int, default=d.start, help="index of the first case")
    r.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="edits written together in one batch")
    r.add_argument("--sequential", action="store_true",
                   help="accumulate edits across batches and evaluate every case after the "
                        "last batch (default: batch mode, the weights restored after each "
                        "batch is evaluated, so batches are independent)")
    r.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="with --sequential: also score --downstream tasks and a probe set of "
                        "earlier edits every K batches into curve.jsonl (0: only at the end)")
    r.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the run (context templates, sampling)")
    r.add_argument("--device", default=d.device, help="auto (CUDA if present), cpu, cuda[:N]")
    r.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16")
    r.add_argument("--data-dir", default=None,
                   help="data directory (default: $KEH_DATA_DIR, else ../shared/data beside "
                        "the checkout if present, else ./data; keh data list)")
    r.add_argument("--data", default=None,
                   help="a specific data file for the suite (default: the suite's first file "
                        "found in the data directory)")
    r.add_argument("--out-dir", "--out", dest="out", default=d.out_dir, metavar="DIR",
                   help="where run directories go (--out is the old name)")
    r.add_argument("--run-id", default=None,
                   help="name of the run directory (default: derived from the config)")
    r.add_argument("--hparams", default=None,
                   help="hparams YAML (default: methods/hparams/<method>/<model>.yaml of the "
                        "preset)")
    r.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override one hyperparameter (repeatable; recorded as "
                        "hparams_overrides; default: none)")
    r.add_argument("--preset", choices=("faithful", "tuned"), default=d.preset,
                   help="hparams preset when --hparams is not given: faithful (the published "
                        "code's behaviour) or tuned (<model>-tuned.yaml)")
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="prompts per forward pass when evaluating")
    r.add_argument("--zsre-target", choices=ZSRE_TARGETS, default=d.zsre_target,
                   help="zsRE target_new: answers0 (ROME/MEMIT/AlphaEdit code) or alt "
                        "(EasyEdit)")
    r.add_argument("--fluency-decoding", choices=FLUENCY_DECODINGS, default=d.fluency_decoding,
                   help="how the fluency/consistency texts are generated: sample_top5_100 "
                        "(the original's top-5 sampling to 100 tokens in total, prompt "
                        "included) or greedy (--generation-tokens new tokens)")
    r.add_argument("--downstream", type=_task_list, default=[], metavar="TASK[,TASK...]",
                   help="lm-eval tasks scored before the first and after the last edit "
                        "(offline: sst2,mrpc,cola,rte,nli,mmlu) and every --eval-every batches")
    r.add_argument("--downstream-limit", type=int, default=d.downstream_limit,
                   help="examples per downstream task (0: all)")
    r.add_argument("--downstream-fewshot", type=int, default=d.downstream_fewshot,
                   help="few-shot examples per downstream prompt (at most 10 for keh's tasks)")
    r.add_argument("--generation-tokens", type=int, default=d.generation_tokens,
                   help="fluency/consistency texts (Flu, Consis): 0 leaves them out; any other "
                        "value generates them. With --fluency-decoding sample_top5_100 every "
                        "text is 100 tokens in total whatever the value; with greedy, this "
                        "many new tokens")
    r.add_argument("--answer-tokens", type=int, default=d.answer_tokens,
                   help="generation-based evaluation: greedy answers of at most N new tokens "
                        "to the rewrite, paraphrase and neighbourhood prompts, exact match and "
                        "token F1 (0: off)")
    r.add_argument("--no-generation-eval", dest="answer_tokens", action="store_const", const=0,
                   help="turn the greedy-answer evaluation off (--answer-tokens 0; the "
                        "fluency texts are --generation-tokens)")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run a hub model's own code")
    r.add_argument("--stop-on-error", action="store_true",
                   help="stop when a method fails on a batch (numerical error, non-finite "
                        "diagnostics) instead of recording its cases as failed")
    r.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a killed run from its last checkpoint; the config comes "
                        "from RUN_DIR/manifest.json (other run flags are refused, except "
                        "--stop-on-error and --allow-revision-change)")
    r.add_argument("--allow-revision-change", action="store_true",
                   help="with --resume: allow a different git commit than the run's")


def _add_report(sub: Any) -> None:
    rp = sub.add_parser("report", help="tables, figures and claim tests from run directories",
                        formatter_class=HELP,
                        description="Build a report (index.md, tables/, figures/) from run "
                                    "directories: tables with intervals, paired comparisons "
                                    "and the claims of docs/METAKE.md.")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="run directories (or folders holding run directories)")
    rp.add_argument("--out", required=True, help="report directory (index.md, tables/, "
                    "figures/)")
    rp.add_argument("--baseline", default="alphaedit",
                    help="method the others are compared against")
    rp.add_argument("--treatment", default="metake",
                    help="method whose claims T1-T8 are tested")
    rp.add_argument("--alpha", type=float, default=0.05, help="family-wise level (Holm)")
    rp.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples")
    rp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")


def _add_compare(sub: Any) -> None:
    cp = sub.add_parser(
        "compare", formatter_class=HELP,
        help="regression gate: is the candidate worse than the baseline? "
        "(exit 1 if so, 0 if not, 2 on bad input)",
        description="Pair the runs by case (seeds averaged per case) and test, per metric, "
        "whether the candidate is worse than the baseline by more than the metric's margin "
        "(one-sided tests at the independent units: the larger p of a cluster sign-flip and a "
        "cluster bootstrap-t test, Tango's exact test for 0/1 outcomes; Holm across metrics). "
        "Default metrics: CounterFact efficacy_success, paraphrase_success, "
        "neighborhood_success, efficacy_margin; zsRE efficacy_accuracy, paraphrase_accuracy, "
        "specificity_accuracy, efficacy_margin. Default margins: 0.02 (2 points) for rates "
        "and accuracies, 0.25 nats for efficacy_margin.")
    cp.add_argument("--baseline", nargs="+", required=True, metavar="RUN_DIR",
                    help="runs of the baseline (one method and setting; seeds may differ)")
    cp.add_argument("--candidate", nargs="+", required=True, metavar="RUN_DIR",
                    help="runs of the candidate on the same cases, data and model")
    cp.add_argument("--metrics", default=None, metavar="M,...",
                    help="record fields to compare (default: the suite's four)")
    cp.add_argument("--margin", action="append", default=[], metavar="M=V",
                    help="non-inferiority margin of metric M in its own units (repeatable or "
                         "comma-separated; default 0.02 for rates, 0.25 for efficacy_margin)")
    cp.add_argument("--lower-is-better", default="", metavar="M,...",
                    help="metrics where lower is better (diag_z_error and kernel energy are "
                         "known; default: none)")
    cp.add_argument("--alpha", type=float, default=0.05,
                    help="level of each one-sided test, Holm across metrics")
    cp.add_argument("--allow-underpowered", action="store_true",
                    help="compare even when the design's smallest p after Holm cannot reach "
                         "alpha (refused by default, exit 2)")
    cp.add_argument("--require-noninferiority", action="store_true",
                    help="exit 1 also when a metric is not shown non-inferior")
    cp.add_argument("--json", default=None, metavar="FILE", help="write the table as JSON")


def _add_data(sub: Any) -> None:
    from harness.datafiles import SUITES

    dp = sub.add_parser("data", help="list and fetch the data files (CounterFact, zsRE, "
                        "GLUE/MMLU subsets, WikiText-2)", formatter_class=HELP,
                        description="The data directory's files: where each was found, its "
                                    "SHA-256 against the pinned one, records and format "
                                    "(list); download what makes each suite runnable, "
                                    "resumable and SHA-256 checked (fetch).")
    dsub = dp.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, text in (("list", "what the data directory holds, checked"),
                       ("fetch", "download what each suite needs and the data directory "
                                 "lacks")):
        a = dsub.add_parser(name, help=text, description=text, formatter_class=HELP)
        a.add_argument("suites", nargs="*", metavar="SUITE",
                       help=f"any of {', '.join(SUITES)} (default: all)")
        a.add_argument("--data-dir", default=None,
                       help="data directory (default: $KEH_DATA_DIR, else ../shared/data "
                            "beside the checkout if present, else ./data)")
    fetch = dsub.choices["fetch"]
    fetch.add_argument("--mirror", default=None, metavar="URL",
                       help="base URL of a copy of the data directory (<URL>/<path>); also "
                            "the only source of files not published at a plain URL")
    fetch.add_argument("--force", action="store_true",
                       help="replace files whose SHA-256 differs from the pinned one")
    fetch.add_argument("--all", dest="everything", action="store_true",
                       help="every file of the table, not only what makes each suite runnable "
                            "(alternatives, the held-out CounterFact split, WikiText-2 test)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model, method=args.method, suite=args.suite, n_edits=args.n_edits,
        start=args.start, batch_size=args.batch_size, sequential=args.sequential,
        eval_every=args.eval_every, seed=args.seed, device=args.device, dtype=args.dtype,
        data_dir=args.data_dir, data=args.data, out_dir=args.out, run_id=args.run_id,
        hparams=args.hparams, hparams_overrides=dict(args.overrides), preset=args.preset,
        zsre_target=args.zsre_target, fluency_decoding=args.fluency_decoding,
        eval_batch_size=args.eval_batch_size, trust_remote_code=args.trust_remote_code,
        downstream=list(args.downstream), downstream_limit=args.downstream_limit,
        downstream_fewshot=args.downstream_fewshot, generation_tokens=args.generation_tokens,
        answer_tokens=args.answer_tokens,
        stop_on_error=args.stop_on_error,
    )


#: run flags that --resume accepts (everything else comes from the run's manifest)
RESUME_FLAGS = ("resume", "allow_revision_change", "stop_on_error")


def _cmd_resume(args: argparse.Namespace) -> None:
    """``keh run --resume RUN_DIR``: refuse run-shaping flags, then resume."""
    from harness.runner import resume

    defaults = vars(build_parser().parse_args(["run"]))
    given = sorted(k for k, v in vars(args).items()
                   if k not in RESUME_FLAGS and k in defaults and v != defaults[k])
    if given:
        flags = ", ".join("--" + ("set" if k == "overrides" else k.replace("_", "-"))
                          for k in given)
        raise UserError(f"--resume takes the run's config from its manifest; drop {flags} "
                        f"(or start a new run)")
    resume(args.resume, allow_revision_change=args.allow_revision_change,
           stop_on_error=args.stop_on_error)


def _cmd_list() -> None:
    from harness.models import BUILTIN_GGUF, PUBLISHED_MODELS, RANDOM_SHAPES
    from methods import METHODS
    from suites import SUITES

    print(json.dumps({"methods": sorted(METHODS), "suites": sorted(SUITES), "models": {
        "built-in (pip packages, CPU or GPU)": sorted(BUILTIN_GGUF),
        "published (GPU; hub access or a local copy)": sorted(PUBLISHED_MODELS),
        "random weights of a published shape (timing, tests)": [
            f"random:{k}" for k in RANDOM_SHAPES],
        "also": "any Hugging Face model id or local model directory"}}, indent=2))


def _cmd_data(args: argparse.Namespace) -> int:
    from harness.datacmd import fetch_data, list_data

    if args.data_command == "list":
        return list_data(args.data_dir, args.suites)
    return fetch_data(args.suites, args.data_dir, args.mirror, args.force, args.everything)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _cmd_compare(args: argparse.Namespace) -> int:
    from reports.compare import parse_margins, run_compare

    return run_compare(args.baseline, args.candidate, metrics=_names(args.metrics),
                       margins=parse_margins(args.margin), alpha=args.alpha,
                       lower_is_better=_names(args.lower_is_better) or [],
                       require_noninferiority=args.require_noninferiority,
                       json_path=args.json, allow_underpowered=args.allow_underpowered)


def one_line(message: str) -> str:
    """A message on one line (a multi-line library message joined with spaces)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run" and args.resume is not None:
            _cmd_resume(args)
        elif args.command == "run":
            from harness.runner import run

            if args.allow_revision_change:
                raise UserError("--allow-revision-change only applies with --resume")
            run(config_from_args(args))
        elif args.command == "list":
            _cmd_list()
        elif args.command == "report":
            from reports.build import build_report

            index = build_report(args.run_dirs, args.out, baseline=args.baseline,
                                 treatment=args.treatment, alpha=args.alpha,
                                 n_resamples=args.n_resamples, seed=args.seed)
            print(f"report: {index}")
        elif args.command == "compare":
            return _cmd_compare(args)
        elif args.command == "data":
            return _cmd_data(args)
    except UserError as exc:
        print(f"keh: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keh: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
