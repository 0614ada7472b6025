"""``nox -s regress -- --method NEW --against alphaedit``: test a method variant against its parent.

Runs the candidate and the baseline on the same cases, model and seeds (reusing complete runs
and continuing killed ones, as the benchmark grid does: :func:`harness.launch.run_cell`), then
gates them with ``keh compare`` (:mod:`reports.compare`); the exit status is the gate's:
1 if the candidate is worse than the baseline beyond a metric's margin, 0 otherwise, 2 on bad
input. ``--set``/``--hparams`` apply to the candidate only, so a variant can be one hparam of
the parent: ``--method alphaedit --set nullspace_threshold=0.05 --against alphaedit``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli import _names, _override, one_line
from harness.config import RunConfig
from harness.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness.regress", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--method", required=True, help="the candidate (a registered method)")
    ap.add_argument("--against", default="alphaedit", help="the baseline method")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--suite", default="counterfact")
    ap.add_argument("--n-edits", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--no-sequential", dest="sequential", action="store_false",
                    help="batch editing (weights restored after each batch) instead of "
                         "sequential")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, run on both sides")
    ap.add_argument("--preset", choices=("faithful", "tuned"), default="faithful",
                    help="hparams preset of both sides")
    ap.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                    metavar="KEY=VALUE", help="candidate hparam override (repeatable)")
    ap.add_argument("--hparams", default=None, help="candidate hparams YAML")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/regress", help="where both sides' runs go")
    ap.add_argument("--metrics", default=None, help="passed to keh compare")
    ap.add_argument("--margin", action="append", default=[], help="passed to keh compare")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--require-noninferiority", action="store_true")
    ap.add_argument("--json", default=None, help="write the comparison as JSON")
    return ap


def configs(args: argparse.Namespace) -> tuple[list[RunConfig], list[RunConfig]]:
    """(baseline, candidate) run configs, one per seed."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers, got {args.seeds!r}") \
            from None
    if not seeds:
        raise UserError("--seeds names no seed")

    def cfg(method: str, seed: int, candidate: bool) -> RunConfig:
        c = RunConfig(model=args.model, method=method, suite=args.suite,
                      n_edits=args.n_edits, batch_size=args.batch_size,
                      sequential=args.sequential, seed=seed, device=args.device,
                      out_dir=args.out, preset=args.preset,
                      hparams=args.hparams if candidate else None,
                      hparams_overrides=dict(args.overrides) if candidate else {})
        c.validate()
        return c

    base = [cfg(args.against, s, False) for s in seeds]
    cand = [cfg(args.method, s, True) for s in seeds]
    same = [b.default_run_id() for b, c in zip(base, cand, strict=True)
            if b.default_run_id() == c.default_run_id()]
    if same:
        raise UserError(f"candidate and baseline are the same run ({same[0]}): change the "
                        f"method, --set or --hparams")
    return base, cand


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from harness.launch import model_loader, run_cell
        from methods import get_method
        from reports.compare import parse_margins, run_compare

        for name in (args.method, args.against):
            get_method(name)
        base, cand = configs(args)
        lm_for = model_loader()
        for c in base + cand:
            if run_cell(c, lm_for=lm_for) == "busy":  # still going in another process
                raise UserError(f"run {Path(c.out_dir) / c.default_run_id()} is in use by "
                                f"another keh process; run the gate again once it has finished")
        dirs = lambda cs: [str(Path(c.out_dir) / c.default_run_id()) for c in cs]  # noqa: E731
        return run_compare(dirs(base), dirs(cand), metrics=_names(args.metrics),
                           margins=parse_margins(args.margin), alpha=args.alpha,
                           require_noninferiority=args.require_noninferiority,
                           json_path=args.json)
    except UserError as exc:
        print(f"keh: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
