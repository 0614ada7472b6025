"""``nox -s regress -- --method NEW --against alphaedit``: test a method variant against its parent.

Runs the candidate and the baseline on the same cases, model and seeds (reusing complete runs
and continuing killed ones, as the benchmark grid does: :func:`harness.launch.run_cell`), then
gates them with ``keh compare`` (:mod:`reports.compare`); the exit status is the gate's:
1 if the candidate is worse than the baseline beyond a metric's margin, 0 otherwise, 2 on bad
input or a design that cannot reach alpha. ``--set``/``--hparams`` apply to the candidate
only, so a variant can be one hparam of the parent: ``--method alphaedit --set
v_num_grad_steps=5 --against alphaedit``; ``--candidate-seeds`` runs the candidate with other
seeds (``--method alphaedit --against alphaedit --candidate-seeds 1``: a null comparison).

Protocols (:data:`PROTOCOLS`), chosen by their power (``docs/USAGE.md``):

* ``batch`` (default): independent edits in batch mode, weights restored after every batch,
  so every batch is its own unit; many units for the edits' cost. It detects what goes wrong
  within one batch of edits: efficacy, generalisation, locality and margin.
* ``sequential``: the edits accumulate; each batch is one unit, so the same budget buys few
  units. It detects what only accumulation breaks, with wider margins of error.

Before anything runs, :func:`plan` prints the design's smallest p-value after Holm and the
drop it detects with 80% power per metric (:mod:`reports.power`, from the planning values of
:data:`PLANNING`), and refuses a design that cannot reach alpha (exit 2) unless
``--allow-underpowered``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.cli import _names, _override, one_line
from harness.config import RunConfig
from harness.errors import UserError
from harness.helptext import HelpFormatter


@dataclass(frozen=True)
class Protocol:
    """A default design of the gate."""

    n_edits: int
    batch_size: int
    sequential: bool
    what: str


#: the gate's designs (docs/USAGE.md gives their arithmetic)
PROTOCOLS: dict[str, Protocol] = {
    "batch": Protocol(160, 10, False, "independent batches of edits (weights restored after "
                                      "each): one unit per batch"),
    "sequential": Protocol(160, 10, True, "edits accumulating over batches: one unit per "
                                          "batch"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness.regress", description=__doc__.split(
        "\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--method", required=True, help="the candidate (a registered method)")
    ap.add_argument("--against", default="alphaedit", help="the baseline method")
    ap.add_argument("--model", default="smollm2-135m", help="model of both sides")
    ap.add_argument("--suite", default="counterfact", help="suite of both sides")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="batch",
                    help="the design: batch (independent edits, many units) or sequential "
                         "(edits accumulate; one unit per batch)")
    ap.add_argument("--n-edits", type=int, default=None,
                    help="cases per side (default: the protocol's)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="edits per batch (default: the protocol's)")
    ap.add_argument("--start", type=int, default=0, help="index of the first case")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of both sides")
    ap.add_argument("--candidate-seeds", default=None,
                    help="the candidate's seeds instead (as many as --seeds; paired in order)")
    ap.add_argument("--preset", choices=("faithful", "tuned"), default="faithful",
                    help="hparams preset of both sides")
    ap.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                    metavar="KEY=VALUE", help="candidate hparam override (repeatable)")
    ap.add_argument("--hparams", default=None, help="candidate hparams YAML")
    ap.add_argument("--against-set", dest="base_overrides", type=_override, action="append",
                    default=[], metavar="KEY=VALUE",
                    help="baseline hparam override (repeatable; e.g. its layers on another "
                         "model)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--out-dir", "--out", dest="out", default="runs/regress", metavar="DIR",
                    help="where both sides' runs go (--out is the old name)")
    ap.add_argument("--metrics", default=None,
                    help="comma-separated record fields (default: the suite's four)")
    ap.add_argument("--margin", action="append", default=[],
                    help="METRIC=VALUE margins (default: reports.compare.DEFAULT_MARGINS)")
    ap.add_argument("--alpha", type=float, default=0.05, help="family-wise level")
    ap.add_argument("--require-noninferiority", action="store_true",
                    help="exit 1 unless every metric is shown non-inferior")
    ap.add_argument("--allow-underpowered", action="store_true",
                    help="run a design that cannot reach alpha after Holm")
    ap.add_argument("--json", default=None, help="write the comparison as JSON")
    return ap


def _seeds(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UserError(f"{flag} names no seed")
    return seeds


def configs(args: argparse.Namespace) -> tuple[list[RunConfig], list[RunConfig]]:
    """(baseline, candidate) run configs, one per seed."""
    proto = PROTOCOLS[args.protocol]
    seeds = _seeds(args.seeds, "--seeds")
    cand_seeds = (seeds if args.candidate_seeds is None
                  else _seeds(args.candidate_seeds, "--candidate-seeds"))
    if len(cand_seeds) != len(seeds):
        raise UserError(f"--candidate-seeds names {len(cand_seeds)} seeds for {len(seeds)} "
                        f"in --seeds; give as many (they pair in order)")

    def cfg(method: str, seed: int, candidate: bool) -> RunConfig:
        c = RunConfig(model=args.model, method=method, suite=args.suite,
                      n_edits=args.n_edits or proto.n_edits,
                      batch_size=args.batch_size or proto.batch_size,
                      sequential=proto.sequential, start=args.start, seed=seed,
                      device=args.device, out_dir=args.out, preset=args.preset,
                      answer_tokens=0,  # the gate's metrics are teacher-forced
                      hparams=args.hparams if candidate else None,
                      hparams_overrides=dict(args.overrides if candidate
                                             else args.base_overrides))
        c.validate()
        return c

    base = [cfg(args.against, s, False) for s in seeds]
    cand = [cfg(args.method, s, True) for s in cand_seeds]
    same = [b.default_run_id() for b, c in zip(base, cand, strict=True)
            if b.default_run_id() == c.default_run_id()]
    if same:
        raise UserError(f"candidate and baseline are the same run ({same[0]}): change the "
                        f"method, --set, --hparams or --candidate-seeds")
    return base, cand


def plan(cfg: RunConfig, n_seeds: int, metrics: list[str], margins: dict[str, float],
         alpha: float, allow_underpowered: bool) -> list[str]:
    """Lines describing the design's power (module notes); raises :class:`UserError` when it
    cannot reach ``alpha`` after Holm and ``allow_underpowered`` is not set."""
    from reports import power
    from reports.compare import DEFAULT_MARGINS, PLANNING

    n_units = -(-cfg.n_edits // cfg.batch_size)
    single = cfg.batch_size == 1 and n_seeds == 1
    floors = [power.floor_p(n_units, single and PLANNING.get(m, power.Planning(False, 1.0))
                            .binary, cfg.n_edits) for m in metrics]
    floor = power.holm_floor(min(floors), len(metrics))
    mode = "sequential" if cfg.sequential else "batch mode"
    lines = [f"design: {cfg.n_edits} cases x {n_seeds} seed(s), {mode}, batches of "
             f"{cfg.batch_size}: {n_units} units; smallest p after Holm over "
             f"{len(metrics)} metrics {floor:.2g} (alpha {alpha:g})"]
    if floor >= alpha:
        need = power.units_for_floor(len(metrics), alpha)
        msg = (f"this design cannot say 'worse': {n_units} units give a smallest p of "
               f"{floor:.3g} after Holm over {len(metrics)} metrics; it needs at least {need} "
               f"units (--n-edits {need * cfg.batch_size} with --batch-size {cfg.batch_size})"
               f", or --allow-underpowered")
        if not allow_underpowered:
            raise UserError(msg)
        lines.append("warning: " + msg)
    for m in metrics:
        p = PLANNING.get(m)
        margin = margins.get(m, DEFAULT_MARGINS.get(m, float("nan")))
        if p is None:
            lines.append(f"  {m}: margin {margin:g}; no planning value (MDE after the run)")
            continue
        mde = power.planned_mde(p, cfg.n_edits, n_units, margin, alpha, len(metrics))
        lines.append(f"  {m}: margin {margin:g}; a drop of {mde:.3g} or more is caught with "
                     f"80% power (planning value {p.background:g}: {p.source})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from harness.launch import model_loader, run_cell
        from methods import get_method
        from reports.compare import DEFAULT_METRICS, parse_margins, run_compare

        for name in (args.method, args.against):
            get_method(name)
        base, cand = configs(args)
        metrics = _names(args.metrics) or list(DEFAULT_METRICS.get(args.suite, ()))
        margins = parse_margins(args.margin)
        if metrics:
            for line in plan(base[0], len(base), metrics, margins, args.alpha,
                             args.allow_underpowered):
                print(line)
        lm_for = model_loader()
        for c in base + cand:
            if run_cell(c, lm_for=lm_for) == "busy":  # still going in another process
                raise UserError(f"run {Path(c.out_dir) / c.default_run_id()} is in use by "
                                f"another keh process; run the gate again once it has finished")
        dirs = lambda cs: [str(Path(c.out_dir) / c.default_run_id()) for c in cs]  # noqa: E731
        return run_compare(dirs(base), dirs(cand), metrics=_names(args.metrics),
                           margins=margins, alpha=args.alpha,
                           require_noninferiority=args.require_noninferiority,
                           json_path=args.json, allow_underpowered=args.allow_underpowered)
    except UserError as exc:
        print(f"keh: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
