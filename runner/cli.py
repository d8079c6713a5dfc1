"""The ``curvbench`` command line.

    curvbench tasks | optimizers            list names, hyperparameters and defaults
    curvbench run --task T --optimizer O    train one configuration over seeds
    curvbench compare FILE.toml             run a comparison grid, print its table
    curvbench show DIR                      print the comparison table of a results dir
    curvbench growth --task T --lengths ... curvature/gradient growth experiment
    curvbench report DIR                    one self-contained HTML page of a dir
    curvbench plot NAME DIR                 one figure of a dir (PNG and SVG)
    curvbench evaluate RUN --length N ...   a run's error counts on longer sequences

Bad input (unknown names, misspelled or out-of-range hyperparameters and run options,
malformed TOML, missing or damaged files, runs that cannot fit in memory) prints one
line naming the field or file and the valid choices and exits with status 2, before
anything is compiled. A comparison whose runs partly failed prints the table of the
others, one line per failed run, and exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from tasks.hparams import ConfigError, declared_hparams


def _list(registry: dict) -> str:
    lines = []
    for name, factory in sorted(registry.items()):
        doc = (factory.__doc__ or "").strip().splitlines()
        lines.append(f"{name}: {doc[0] if doc else ''}")
        for hp in declared_hparams(factory).values():
            lines.append(f"    {hp.name} = {hp.default!r}  ({hp.type_name()})")
    return "\n".join(lines)


def _cmd_tasks(args) -> int:
    from tasks.registry import TASKS

    print(_list(TASKS))
    return 0


def _cmd_optimizers(args) -> int:
    from optimizers.registry import OPTIMIZERS

    print(_list(OPTIMIZERS))
    print("\nAny optax factory by import path, e.g. --optimizer optax.adam")
    return 0


def _run_options(args) -> dict:
    """The run options given as flags (each derived from :class:`RunOptions`)."""
    from runner.options import option_specs

    return {
        name: getattr(args, name)
        for name in option_specs()
        if getattr(args, name, None) is not None
    }


def _cmd_run(args) -> int:
    from runner.config import parse_assignments, parse_comparison

    task_hp = parse_assignments(args.task_param, "--task-param")
    opt_hp = parse_assignments(args.opt_param, "--opt-param")
    for reserved in ("name", "label", "grid", "task"):
        for what, given in (("--task-param", task_hp), ("--opt-param", opt_hp)):
            if reserved in given:
                raise ConfigError(f"{what} cannot set {reserved!r}")
    entry_opt = {"name": args.optimizer, **opt_hp}
    if args.label:
        entry_opt["label"] = args.label
    data = {"task": [{"name": args.task, **task_hp}], "optimizer": [entry_opt]}
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"run-{args.task}-{args.optimizer}")
    comparison = parse_comparison(data, name, overrides=_run_options(args))
    return _compare(comparison, args, default_executor="serial")


def _compare(comparison, args, default_executor=None) -> int:
    from analysis.table import show
    from runner.compare import compare, results_dir
    from runner.executors import ExecutorConfig

    out = results_dir(comparison, args.out)
    executor = args.executor or default_executor
    if executor is not None:
        executor = ExecutorConfig.parse(executor)  # checked before anything runs
    progress = None if not args.quiet else False
    batch_grid = True if getattr(args, "batch_grid", False) else None
    outcome = compare(
        comparison, out, progress=progress, executor=executor, batch_grid=batch_grid
    )
    if outcome.results:
        print(show(out, markdown=getattr(args, "markdown", False)))
    print(f"\nresults: {out}")
    for failure in outcome.failures:
        print(
            f"curvbench: error: run {failure.label!r} on {failure.task} failed: "
            f"{failure.error}",
            file=sys.stderr,
        )
    return 1 if outcome.failures else 0


def _cmd_compare(args) -> int:
    from runner.config import read_comparison

    return _compare(read_comparison(args.file, _run_options(args)), args)


def _cmd_show(args) -> int:
    from analysis.table import show

    target = None
    if args.target is not None:
        column, sep, value = args.target.partition("=")
        try:
            target = (column, float(value))
        except ValueError:
            sep = ""
        if not sep or column not in ("eval_loss", "eval_error", "loss"):
            raise ConfigError(
                f"--target {args.target!r} must look like COLUMN=VALUE with COLUMN "
                "one of eval_loss, eval_error, loss"
            )
    print(
        show(
            args.dir, markdown=args.markdown, target=target, explosions=args.explosions
        )
    )
    return 0


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _cmd_growth(args) -> int:
    from analysis.curvature_plots import growth_plot, ratio_vs_x
    from analysis.growth import growth_experiment
    from analysis.plots import save_figure
    from analysis.probes import ProbeConfig
    from runner.config import parse_assignments

    if (args.lengths is None) == (args.radii is None):
        raise ConfigError("give exactly one of --lengths and --radii")
    if args.task is None and args.run is None:
        raise ConfigError("give --task or --run")
    if args.step is not None and args.run is None:
        raise ConfigError("--step picks a checkpoint of --run; give --run too")
    x = "length" if args.lengths is not None else "radius"
    values = args.lengths if x == "length" else args.radii
    rows, fits, path = growth_experiment(
        args.task, x, values, name=args.name, out=args.out, run_file=args.run,
        step=args.step, task_hparams=parse_assignments(args.task_param, "--task-param"),
        seeds=range(args.seeds), batches=args.batches, radius=args.radius,
        config=ProbeConfig(lanczos_iters=args.lanczos_iters),
    )  # fmt: skip
    shown = fits[["init", "source", "kind", "quantity", "x", "slope", "slope_low",
                  "slope_high", "n"]]  # fmt: skip
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    stem = path.with_name(path.name.removesuffix(".growth.json"))
    for suffix, fig in (
        ("", growth_plot(rows, fits, x=x)),
        ("-ratio", ratio_vs_x(rows, x=x)),
    ):
        save_figure(fig, stem.with_name(stem.name + suffix))
    print(f"\nresults: {path} (figures: {stem}.png, {stem}-ratio.png)")
    return 0


def _cmd_evaluate(args) -> int:
    from runner.evaluate import evaluate, format_table

    def progress(row: dict) -> None:
        print(
            f"length {row['length']} seed {row['seed']}: {row['errors']} errors in "
            f"{row['sequences']} sequences ({row['seconds']:.1f} s)",
            file=sys.stderr,
        )

    frame = evaluate(
        args.run, args.length, sequences=args.sequences, batch=args.batch,
        seed=args.seed, step=args.step, progress=None if args.quiet else progress,
    )  # fmt: skip
    print(format_table(frame))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.csv, index=False)
        print(f"\ncsv: {args.csv}")
    return 0


def _cmd_report(args) -> int:
    from analysis.report import write_report

    print(write_report(args.dir, out=args.out, title=args.title))
    return 0


def _cmd_plot(args) -> int:
    from analysis.plots import save_figure
    from analysis.report import FIGURES, X_FIGURES, build_figure
    from analysis.results import Results

    if args.name not in FIGURES:
        raise ConfigError(f"unknown plot {args.name!r}; choose from {sorted(FIGURES)}")
    if args.x is not None and args.name not in X_FIGURES:
        raise ConfigError(f"--x applies to {', '.join(X_FIGURES)}, not {args.name!r}")
    fig = build_figure(args.name, Results.load(args.dir), x=args.x)
    if fig is None:
        raise ConfigError(f"{args.dir} has no data for the {args.name!r} plot")
    suffix = "" if args.x in (None, "step") else f"-{args.x}"
    stem = Path(args.out) if args.out else Path(args.dir) / f"{args.name}{suffix}"
    for path in save_figure(fig, stem, formats=tuple(args.format)):
        print(path)
    return 0


def _option_value(text: str):
    """A run option's value: TOML syntax (``5``, ``[0, 3]``, ``true``, ``1e-3``).

    Types and ranges are checked by :class:`runner.options.RunOptions`.
    """
    from runner.config import parse_value

    return parse_value(text)


def _metavar(spec) -> str:
    if spec.kind is bool:
        return "true|false"
    if spec.kind in (int, float):
        return spec.kind.__name__.upper()
    return "N|[SEEDS]"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvbench",
        description="Compare optimizers on RNNs with exploding gradients.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list tasks and their hyperparameters")
    sub.add_parser("optimizers", help="list optimizers and their hyperparameters")

    def run_options(p):
        from runner.options import option_help, option_specs

        for name, spec in option_specs().items():
            p.add_argument(
                "--" + name.replace("_", "-"),
                type=_option_value,
                metavar=_metavar(spec),
                help=f"{option_help(name)} (default: {spec.default})",
            )
        p.add_argument("--out", help="results directory (default: results/<name>)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--executor",
            metavar="KIND",
            help="where runs train: serial, local[:N] (N worker processes; default "
            "for compare: one per core), dask[:ADDRESS], slurm[:N] (default for "
            "run: serial; overrides the file's [executor] table)",
        )

    run = sub.add_parser("run", help="train one task/optimizer over several seeds")
    run.add_argument("--task", required=True)
    run.add_argument("--optimizer", required=True)
    run.add_argument("--label", help="the optimizer's name in the table")
    run.add_argument(
        "--task-param", "-t", action="append", metavar="NAME=VALUE", help="repeatable"
    )
    run.add_argument(
        "--opt-param", "-o", action="append", metavar="NAME=VALUE", help="repeatable"
    )
    run_options(run)

    cmp = sub.add_parser("compare", help="run a comparison TOML file")
    cmp.add_argument("file")
    cmp.add_argument("--markdown", action="store_true", help="print a Markdown table")
    cmp.add_argument(
        "--batch-grid",
        action="store_true",
        help="train the grid points of each sweep over traced hyperparameters as one "
        "vmapped program (as batch_grid = true in the file)",
    )
    run_options(cmp)

    show = sub.add_parser("show", help="print the comparison table of a results dir")
    show.add_argument("dir")
    show.add_argument("--markdown", action="store_true", help="print a Markdown table")
    show.add_argument(
        "--target", metavar="COLUMN=VALUE",
        help="also give the median work until COLUMN (eval_loss, eval_error or loss) "
        "first fell to VALUE at an evaluation, e.g. eval_loss=0.1",
    )  # fmt: skip
    show.add_argument(
        "--explosions", action="store_true",
        help="also print gradient-explosion statistics per configuration",
    )  # fmt: skip

    growth = sub.add_parser("growth", help="curvature vs gradient growth experiment")
    growth.add_argument("--task", help="registered task (or take it from --run)")
    growth.add_argument(
        "--task-param", "-t", action="append", metavar="NAME=VALUE", help="repeatable"
    )
    growth.add_argument("--lengths", type=_numbers, help="e.g. 10,20,40,80")
    growth.add_argument("--radii", type=_numbers, help="spectral radii of W_rec")
    growth.add_argument(
        "--radius", type=_positive_float,
        help="with --lengths: rescale W_rec to this radius",
    )  # fmt: skip
    growth.add_argument("--run", help="a run file: probe its saved parameters")
    growth.add_argument("--step", type=int, help="with --run: a checkpoint step")
    growth.add_argument(
        "--seeds", type=_positive, default=5, help="with --run: the run's seeds"
    )
    growth.add_argument("--batches", type=_positive, default=4, help="per seed")
    growth.add_argument("--lanczos-iters", type=_positive, default=20)
    growth.add_argument("--name", help="file name (default: task-init-x)")
    growth.add_argument("--out", default="results/growth", help="results directory")

    evaluate = sub.add_parser(
        "evaluate", help="error counts of a stored run on fresh, longer sequences"
    )
    evaluate.add_argument("run", help="a run file (RUN_ID.json)")
    evaluate.add_argument(
        "--length", type=_positive, nargs="+", action="extend", metavar="N",
        help="sequence lengths, e.g. --length 500 1000 (default: the run's length)",
    )  # fmt: skip
    evaluate.add_argument(
        "--sequences", type=_positive, default=10_000, help="per length and seed"
    )
    evaluate.add_argument(
        "--batch", type=_positive, default=1000, help="sequences per forward pass"
    )
    evaluate.add_argument(
        "--seed", type=int, default=0, help="seed of the fresh sequences"
    )
    evaluate.add_argument("--step", type=int, help="evaluate this checkpoint")
    evaluate.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    evaluate.add_argument("--quiet", action="store_true", help="no progress lines")

    report = sub.add_parser("report", help="write a self-contained HTML report")
    report.add_argument("dir")
    report.add_argument("--out", help="HTML file (default: DIR/report.html)")
    report.add_argument("--title")

    plot = sub.add_parser("plot", help="save one figure of a results directory")
    plot.add_argument("name", help="training, traces, curvature, wall, growth, ...")
    plot.add_argument("dir")
    plot.add_argument("--out", help="file stem (default: DIR/NAME[-X])")
    plot.add_argument(
        "--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"]
    )
    plot.add_argument(
        "--x", choices=["step", "grad_equivalents", "seconds"],
        help="horizontal axis of the curves over training (training, error, "
        "traces, spectrum): updates, gradient-equivalents or training seconds "
        "(default: the figure's own, updates)",
    )  # fmt: skip
    return parser


COMMANDS = {
    "tasks": _cmd_tasks,
    "optimizers": _cmd_optimizers,
    "run": _cmd_run,
    "compare": _cmd_compare,
    "show": _cmd_show,
    "growth": _cmd_growth,
    "report": _cmd_report,
    "plot": _cmd_plot,
    "evaluate": _cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``curvbench`` console script."""
    from runner.worker import use_one_thread

    use_one_thread()  # before JAX's first computation: see its docstring
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, OSError) as err:  # bad input, or a path that cannot be used
        print(f"curvbench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
