"""``normzoo sweep`` and ``normzoo report``: a grid of runs into one folder, and the report on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from normzoo.cli.app import cli
from normzoo.cli.training import RUN_OPTIONS, RunOption
from normzoo.errors import NormzooError

if TYPE_CHECKING:
    from normzoo.sweep import PlannedRun

SWEEP_EPILOG = """\b
Examples:
  normzoo sweep --norm none,bn,noisy-bn,lp:1,lp:2,lp:inf,gn:32 --lr 0.1,0.5 --seed 0,1,2 \\
      --preset santurkar2018 --probe landscape:every=100 --out sweeps/santurkar
  normzoo sweep --norm "bn;lp:1,centered=true" --dataset fashion-mnist-mini --steps 500 --jobs 2 --out sweeps/lp
  normzoo sweep ... --out sweeps/santurkar --retry-failed     # same command again: skip finished, resume the rest
  normzoo sweep --executor ray --address auto --norm bn,lp:inf --lr 0.1,0.5 --seed 0,1,2 --out sweeps/x
  normzoo sweep --executor slurm --slurm-partition gpu --gpus-per-run 1 --cpus-per-run 8 --time 4:00:00 \\
      --device cuda --norm bn,lp:inf --lr 0.1,0.5 --seed 0,1,2 --out sweeps/x
  normzoo report sweeps/santurkar
"""
SPEC_OPTIONS = {"backbone", "norm", "dataset", "preset"}
# The executors each executor option is for: the others refuse it rather than ignore it.
EXECUTOR_OPTIONS = {"jobs": ("local",), "address": ("ray",), "cpus_per_run": ("ray", "slurm"),
                    "gpus_per_run": ("ray", "slurm"), "slurm_partition": ("slurm",), "time": ("slurm",),
                    "slurm_folder": ("slurm",), "slurm_cluster": ("slurm",)}
NO_JOBS = {"ray": "Ray runs as many at once as the cluster's resources allow",
           "slurm": "SLURM runs as many at once as the cluster has room for"}
TRUE, FALSE = {"true", "on", "yes", "1"}, {"false", "off", "no", "0"}


def parse_values(option: RunOption, texts: tuple[str, ...]) -> list[Any]:
    """The values of one sweep option: comma lists (specs split by :func:`split_specs`), option repeatable."""
    from normzoo.sweep import split_specs

    values: list[Any] = []
    for text in texts:
        pieces = split_specs(text) if option.field in SPEC_OPTIONS else [p.strip() for p in text.split(",")]
        for piece in filter(None, pieces):
            values.append(convert(option, piece))
    return values


def convert(option: RunOption, text: str) -> Any:
    if option.type == "bool":
        if text.lower() not in TRUE | FALSE:
            raise NormzooError(f"{option.flag} takes true or false values, got '{text}'")
        return text.lower() in TRUE
    if option.field == "compile" and text.lower() in ("none", "off"):
        return None
    try:
        return click.types.convert_type(option.type).convert(text, None, None)
    except click.BadParameter as exc:
        raise NormzooError(f"{option.flag}: {exc.message}") from None


def sweep_options(command: Any) -> Any:
    for option in reversed(RUN_OPTIONS):
        kind = "true,false" if option.type == "bool" else "LIST"
        command = click.option(option.flag, option.field, multiple=True, metavar=kind,
                               help=option.help + " Comma list or repeated.")(command)
    return command


@cli.command(epilog=SWEEP_EPILOG)
@sweep_options
@click.option("--probe", "probes", multiple=True, help="Probe spec for every run, repeatable (see 'normzoo probes').")
@click.option("--log", "loggers", multiple=True, help="Experiment tracker for every run, repeatable (tensorboard: one "
                                                     "TensorBoard run per sweep run, named by what varies).")
@click.option("--out", type=click.Path(file_okay=False),
              help="The sweep folder: one subfolder per run, sweep.json and sweep.csv.  [default: the experiment "
                   "file's [sweep] out]")
@click.option("--executor", type=click.Choice(["local", "ray", "slurm"]), default="local", show_default=True,
              help="local: each run is a process of this sweep, --jobs at once. ray: each run is a Ray task "
                   "(pip install 'normzoo[ray]'). slurm: each run is a SLURM job (pip install 'normzoo[slurm]'). "
                   "For ray and slurm the sweep folder must be on a filesystem all nodes share.")
@click.option("--address", help="With --executor ray: the cluster, as ray.init takes it (auto, HOST:PORT, "
                                "ray://HOST:PORT).  [default: $RAY_ADDRESS, else a new local Ray instance]")
@click.option("--cpus-per-run", type=click.FloatRange(0),
              help="With --executor ray or slurm: CPUs each run requests (and its OpenMP threads); whole ones for "
                   "SLURM.  [default: 1]")
@click.option("--gpus-per-run", type=click.FloatRange(0),
              help="With --executor ray or slurm: GPUs each run requests; a fraction shares a GPU (Ray only).  "
                   "[default: 1 for a run on CUDA (--device cuda, or auto when this machine has CUDA), else 0]")
@click.option("--slurm-partition", help="With --executor slurm: the partition the jobs go to.  [default: the "
                                        "cluster's default partition]")
@click.option("--time", help="With --executor slurm: each job's time limit, in minutes (90) or as SLURM writes it "
                             "(4:00:00, 2-00:00:00); a run that needs longer saves a checkpoint and its job is "
                             "requeued.  [default: 60]")
@click.option("--slurm-folder", type=click.Path(file_okay=False),
              help="With --executor slurm: where submitit keeps the job scripts and the jobs' own logs (runs log "
                   "into their run.log).  [default: OUT/slurm]")
# A testing aid: submitit's local executor runs each job as a process on this machine.
@click.option("--slurm-cluster", type=click.Choice(["slurm", "local"]), hidden=True)
@click.option("--jobs", type=click.IntRange(1),
              help="With --executor local: runs at once, one per GPU when several are present, CPU threads split "
                   "otherwise.  [default: 1]")
@click.option("--retry-failed", is_flag=True, help="Run failed runs again (from their checkpoint when they have one).")
@click.option("--dry-run", is_flag=True, help="Print the runs and their commands without running anything.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("experiment", required=False, type=click.Path(dir_okay=False))
def sweep(experiment: str | None, probes: tuple[str, ...], loggers: tuple[str, ...], out: str | None, executor: str,
          address: str | None, cpus_per_run: float | None, gpus_per_run: float | None, slurm_partition: str | None,
          time: str | None, slurm_folder: str | None, slurm_cluster: str | None, jobs: int | None,
          retry_failed: bool, dry_run: bool, quiet: bool, **lists: tuple[str, ...]) -> None:
    """Run the grid of every combination of the listed option values into one folder.

    EXPERIMENT, optional, is a TOML experiment file: [grid] lists, [run] options every run shares, [sweep]
    (out, executor, jobs, ...) and [report]; options given on the command line win over it.

    Every 'normzoo run' option takes a comma list (norm specs keep their ',key=value' parameters; ';' also
    separates). Each run is its own 'normzoo run' process writing OUT/<option-values>/; sweep.csv gets one row
    per run (options, state, final and best metrics, probe medians, time). Running the same command again skips
    finished and diverged runs, resumes interrupted ones from their checkpoint and retries failed ones only with
    --retry-failed. A run that fails or diverges never stops the sweep; the exit code is 1 if any run failed.
    Ctrl-C lets every running run save a checkpoint first.

    With --executor ray each run is a Ray task requesting --cpus-per-run and --gpus-per-run; Ray runs as many at
    once as the cluster has resources for (so --jobs does not apply), with the same folder, resume and Ctrl-C
    behaviour. With --executor slurm each run is a SLURM job (array jobs) on --slurm-partition with --time; at
    its time limit or when pre-empted the run saves a checkpoint and its job is requeued to resume it.
    """
    from normzoo.experiment import Experiment, read_experiment
    from normzoo.sweep import Executor, LocalExecutor, Sweep, command_text, plan

    file = read_experiment(experiment) if experiment else Experiment(Path())
    ctx = click.get_current_context()
    given = {name for name in ctx.params if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    settings = {"out": out, "executor": executor, "address": address, "cpus_per_run": cpus_per_run,
                "gpus_per_run": gpus_per_run, "jobs": jobs, "slurm_partition": slurm_partition, "time": time,
                "slurm_folder": slurm_folder}
    settings.update({k: v for k, v in file.sweep.items() if k not in given})
    out, executor, address = settings["out"], settings["executor"], settings["address"]
    cpus_per_run, gpus_per_run, jobs = settings["cpus_per_run"], settings["gpus_per_run"], settings["jobs"]
    slurm_partition, time, slurm_folder = settings["slurm_partition"], settings["time"], settings["slurm_folder"]
    if out is None:
        raise NormzooError("give the sweep folder: --out DIR, or out = \"DIR\" under [sweep] in an experiment file")
    options = {o.field: o for o in RUN_OPTIONS}
    shared = {k: v for k, v in file.run.items() if k not in ("probes", "loggers")}
    grid = {**file.grid, **{k: [v] for k, v in shared.items() if k not in file.grid},
            **{field: parse_values(options[field], texts) for field, texts in lists.items() if texts}}
    fixed: dict[str, Any] = {key: value for key, value in (("probes", list(probes) or file.run.get("probes")),
                                                           ("loggers", list(loggers) or file.run.get("loggers")))
                             if value}
    runs = plan(grid, fixed)
    validate(runs)
    refuse_with(executor, jobs=jobs, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                slurm_partition=slurm_partition, time=time, slurm_folder=slurm_folder, slurm_cluster=slurm_cluster)
    chosen: Executor
    if executor == "ray":
        from normzoo.sweep_ray import RayExecutor, import_ray

        import_ray()  # before anything runs: without Ray installed, say how to get it
        refuse_pinned_devices(runs, "Ray")
        chosen = RayExecutor(address=address, cpus_per_run=1.0 if cpus_per_run is None else cpus_per_run,
                             gpus_per_run=gpus_per_run)
    elif executor == "slurm":
        from normzoo.sweep_slurm import DEFAULT_TIME_MIN, SlurmExecutor, import_submitit, slurm_minutes, whole

        import_submitit()  # before anything runs: without submitit installed, say how to get it
        refuse_pinned_devices(runs, "SLURM")
        chosen = SlurmExecutor(Path(slurm_folder or Path(out) / "slurm"), partition=slurm_partition,
                               cpus_per_run=whole(cpus_per_run, "--cpus-per-run", 1) or 1,
                               gpus_per_run=whole(gpus_per_run, "--gpus-per-run", 0),
                               time_min=DEFAULT_TIME_MIN if time is None else slurm_minutes(time),
                               cluster=slurm_cluster or "slurm")
    else:
        chosen = LocalExecutor.for_runs(runs, jobs or 1)
    if dry_run:
        click.echo(f"dry run: {len(runs)} runs into {out} ({chosen.describe(runs)})")
        for run in runs:
            click.echo(f"{Path(out) / run.name}\n  {command_text(run.command(Path(out)))}")
        return
    click.echo(f"sweep of {len(runs)} runs into {out} ({chosen.describe(runs)})")
    definition = {"grid": grid, "fixed": fixed, "report": file.report,
                  **({"experiment": str(file.path)} if experiment else {})}
    counts = Sweep(runs, out, retry_failed=retry_failed, echo=click.echo, definition=definition,
                   executor=chosen).execute(progress=not quiet)
    click.echo(f"{out}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
               f"\nsweep.csv: {Path(out) / 'sweep.csv'}\nreport:    normzoo report {out}")
    if counts.get("interrupted") or counts.get("started") or counts.get("pending"):
        click.echo("Stopped; run the same command again to continue.", err=True)
        raise SystemExit(130)
    if counts.get("locked"):
        click.echo(f"{counts['locked']} run(s) are being written by another process (another sweep or run); run "
                   "the same command again once it is done to see them all in sweep.csv.", err=True)
    if counts.get("failed"):
        raise SystemExit(1)


def refuse_with(executor: str, **given: object) -> None:
    """Options of other executors are refused rather than ignored: the sweep would not do what they say."""
    wrong: dict[tuple[str, ...], list[str]] = {}  # the executors they are for -> flags given
    for name, value in given.items():
        if value is not None and executor not in EXECUTOR_OPTIONS[name]:
            wrong.setdefault(EXECUTOR_OPTIONS[name], []).append(f"--{name.replace('_', '-')}")
    if wrong:
        parts = []
        for owners, flags in wrong.items():
            why = f" ({NO_JOBS[executor]}; see --cpus-per-run, --gpus-per-run)" if "--jobs" in flags else ""
            parts.append(f"{', '.join(flags)} only with --executor {' or '.join(owners)}{why}")
        raise NormzooError("; ".join(parts))


def refuse_pinned_devices(runs: list[PlannedRun], cluster: str) -> None:
    """A cluster gives each run its own GPUs (as CUDA_VISIBLE_DEVICES): a run names none of them."""
    pinned = sorted({str(d) for d in (r.options.get("device") for r in runs)
                     if str(d).startswith("cuda:") and str(d) != "cuda:0"})
    if pinned:
        raise NormzooError(f"--device {pinned[0]} with --executor {cluster.lower()}: {cluster} gives each run its "
                           "own GPUs (as CUDA_VISIBLE_DEVICES), so use --device cuda and --gpus-per-run")


def validate(runs: list[PlannedRun]) -> None:
    """Every run's settings and specs are checked before the first run starts."""
    from normzoo.config import RunConfig, apply_preset
    from normzoo.plugins import registry

    for run in runs:
        values = dict(run.options)
        preset = values.pop("preset", None)
        config = RunConfig(**(apply_preset(preset, values) if preset else values))
        config.validate()
        for kind, spec in [("norms", config.norm), ("backbones", config.backbone), ("datasets", config.dataset),
                           *[("probes", p) for p in config.probes], *[("loggers", g) for g in config.loggers]]:
            registry(kind).parse(spec)


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--target-acc", type=click.FloatRange(0, 1),
              help="Training accuracy that defines 'steps to target'.  [default: 80% of the best scheme's final "
                   "training accuracy, rounded down to 5%]")
@click.option("--title", help="Report title.  [default: normzoo report: <folder name>]")
def report(path: str, target_acc: float | None, title: str | None) -> None:
    """Write report.md, report.html (self-contained) and report-figures/*.png for a run or sweep folder.

    PATH is the folder, or the experiment file that made it (its [sweep] out, its [report] options). A sweep
    folder remembers its experiment file's [report] options; options given here win.

    \b
    Example:
      normzoo report sweeps/santurkar && xdg-open sweeps/santurkar/report.html
      normzoo report examples/santurkar2018-small.toml
    """
    from normzoo.report import write_report

    folder, defaults = report_source(Path(path))
    target_acc = target_acc if target_acc is not None else defaults.get("target_acc")
    files = write_report(folder, target_acc=target_acc, title=title or defaults.get("title"))
    click.echo(f"{files.html}\n{files.markdown}\n{len(files.figures)} figures in {files.figures[0].parent}"
               if files.figures else f"{files.html}\n{files.markdown}")


def report_source(path: Path) -> tuple[Path, dict[str, Any]]:
    """The folder to report on and the [report] options that go with it (from the experiment file, or the ones a
    sweep folder's sweep.json kept)."""
    import json

    from normzoo.experiment import read_experiment

    if path.is_file():
        experiment = read_experiment(path)
        if "out" not in experiment.sweep:
            raise NormzooError(f"{path} names no sweep folder (out under [sweep]); give the folder instead")
        return Path(experiment.sweep["out"]), experiment.report
    try:
        definition = json.loads((path / "sweep.json").read_text())
    except (FileNotFoundError, ValueError):
        return path, {}
    report = definition.get("report") if isinstance(definition, dict) else None
    return path, report if isinstance(report, dict) else {}
