"""Command line: ``keh run``, ``keh list``, ``keh report``, ``keh compare`` (also
``python -m harness``).

Bad input ends with one line on stderr (``keh: error: ...``) and exit status 2, and so does a
run stopped by ``--stop-on-error``. ``keh run --resume RUN_DIR`` continues a killed run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from harness.config import FLUENCY_DECODINGS, ZSRE_TARGETS, RunConfig
from harness.errors import UserError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="edit a model and evaluate it on a suite")
    d = RunConfig()
    r.add_argument("--model", default=d.model,
                   help="smollm2-135m | gemma3-270m | random:<shape> | HF id | local dir")
    r.add_argument("--method", default=d.method)
    r.add_argument("--suite", default=d.suite)
    r.add_argument("--n-edits", type=int, default=d.n_edits)
    r.add_argument("--start", type=int, default=d.start, help="index of the first case")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--sequential", action="store_true",
                   help="accumulate edits across batches; evaluate after the last batch")
    r.add_argument("--eval-every", type=int, default=d.eval_every)
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--device", default=d.device)
    r.add_argument("--dtype", default=d.dtype)
    r.add_argument("--data-dir", default=None, help="data directory (default $KEH_DATA_DIR)")
    r.add_argument("--data", default=None, help="a specific data file for the suite")
    r.add_argument("--out", default=d.out_dir, help="where run directories go")
    r.add_argument("--run-id", default=None)
    r.add_argument("--hparams", default=None, help="hparams YAML (default: per method/model)")
    r.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="KEY=VALUE", help="override one hyperparameter (repeatable)")
    r.add_argument("--preset", choices=("faithful", "tuned"), default=d.preset,
                   help="hparams preset when --hparams is not given: faithful (the published "
                        "code's behaviour, default) or tuned (<model>-tuned.yaml)")
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    r.add_argument("--zsre-target", choices=ZSRE_TARGETS, default=d.zsre_target,
                   help="zsRE target_new: answers0 (ROME/MEMIT/AlphaEdit code, default) or alt "
                        "(EasyEdit)")
    r.add_argument("--fluency-decoding", choices=FLUENCY_DECODINGS, default=d.fluency_decoding,
                   help="generation for fluency/consistency: sample_top5_100 (the original's "
                        "top-5 sampling to 100 tokens in total, default) or greedy "
                        "(--generation-tokens new tokens)")
    r.add_argument("--downstream", type=_task_list, default=[], metavar="TASK[,TASK...]",
                   help="lm-eval tasks evaluated before the first and after the last edit "
                        "(offline: sst2,mrpc,cola,rte,nli,mmlu) and every --eval-every batches")
    r.add_argument("--downstream-limit", type=int, default=d.downstream_limit,
                   help="examples per downstream task (0: all)")
    r.add_argument("--downstream-fewshot", type=int, default=d.downstream_fewshot,
                   help="few-shot examples per downstream prompt (at most 10 for keh's tasks)")
    r.add_argument("--generation-tokens", type=int, default=d.generation_tokens,
                   help="greedy tokens per prompt for fluency/consistency (0: off)")
    r.add_argument("--answer-tokens", type=int, default=d.answer_tokens,
                   help="generation-based evaluation: greedy answers of at most N new tokens, "
                        f"exact match and token F1 (default {d.answer_tokens}; 0: off)")
    r.add_argument("--no-generation-eval", dest="answer_tokens", action="store_const", const=0,
                   help="turn the generation-based evaluation off (same as --answer-tokens 0)")
    r.add_argument("--trust-remote-code", action="store_true")
    r.add_argument("--stop-on-error", action="store_true",
                   help="stop when a method fails on a batch (numerical error, non-finite "
                        "diagnostics) instead of recording its cases as failed")
    r.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a killed run from its last checkpoint; the config comes "
                        "from RUN_DIR/manifest.json (other run flags are refused, except "
                        "--stop-on-error and --allow-revision-change)")
    r.add_argument("--allow-revision-change", action="store_true",
                   help="with --resume: allow a different git commit than the run's")

    sub.add_parser("list", help="list methods, suites and built-in models")

    rp = sub.add_parser("report", help="tables, figures and claim tests from run directories")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="run directories (or folders holding run directories)")
    rp.add_argument("--out", required=True, help="report directory (index.md, tables/, "
                    "figures/)")
    rp.add_argument("--baseline", default="alphaedit",
                    help="method the others are compared against (default alphaedit)")
    rp.add_argument("--treatment", default="metake",
                    help="method whose claims T1-T8 are tested (default metake)")
    rp.add_argument("--alpha", type=float, default=0.05, help="family-wise level (Holm)")
    rp.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples")
    rp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")

    cp = sub.add_parser(
        "compare", help="regression gate: is the candidate worse than the baseline? "
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
                         "known)")
    cp.add_argument("--alpha", type=float, default=0.05,
                    help="level of each one-sided test, Holm across metrics (default 0.05)")
    cp.add_argument("--allow-underpowered", action="store_true",
                    help="compare even when the design's smallest p after Holm cannot reach "
                         "alpha (refused by default, exit 2)")
    cp.add_argument("--require-noninferiority", action="store_true",
                    help="exit 1 also when a metric is not shown non-inferior")
    cp.add_argument("--json", default=None, metavar="FILE", help="write the table as JSON")
    return parser


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
    from harness.models import known_models
    from methods import METHODS
    from suites import SUITES

    print(json.dumps({"methods": sorted(METHODS), "suites": sorted(SUITES),
                      "models": known_models()}, indent=2))


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
    except UserError as exc:
        print(f"keh: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keh: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
