"""``normzoo run``, ``eval`` and ``inspect``: the training job and checkpoint tools."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from normzoo.cli.app import cli, format_table
from normzoo.errors import NormzooError

RUN_EPILOG = """\b
Examples:
  normzoo run --backbone vgg11 --norm lp:inf --dataset fashion-mnist-mini --steps 600 --device cpu
  normzoo run --backbone vgg11 --norm noisy-bn --preset santurkar2018          # CIFAR-10, paper setting
  normzoo run --backbone timm:resnet18 --norm gn:8 --epochs 30 --compile reduce-overhead
  normzoo run --resume runs/20261123-101500-vgg11-lp_inf-s0                      # continue after Ctrl-C
  normzoo run --config runs/20261123-101500-vgg11-lp_inf-s0/config.json --seed 1 --run-name again
  normzoo run --norm lp:inf --log tensorboard && tensorboard --logdir runs      # watch runs in TensorBoard
  torchrun --nproc-per-node 4 -m normzoo run --norm bn:sync=true --batch-size 512   # data-parallel, global batch
"""


def _defaults() -> Any:
    from normzoo.config import RunConfig  # no torch import

    return RunConfig()


D = _defaults()


@dataclass(frozen=True)
class RunOption:
    """One ``normzoo run`` option; ``normzoo sweep`` builds a comma-list version of the same option from it."""

    flag: str  # "--batch-size"
    type: Any  # a click type; "bool" for --x/--no-x switches
    help: str

    @property
    def field(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


RUN_OPTIONS = [
    RunOption("--backbone", str, f"Backbone spec (see 'normzoo backbones').  [default: {D.backbone}]"),
    RunOption("--norm", str, f"Norm spec (see 'normzoo norms').  [default: {D.norm}]"),
    RunOption("--dataset", str, f"Dataset spec (see 'normzoo datasets').  [default: {D.dataset}]"),
    RunOption("--data-dir", str,
              "Where datasets are found or downloaded.  [default: $NORMZOO_DATA or ~/.cache/normzoo]"),
    RunOption("--steps", click.IntRange(1), "Optimizer steps (default: 1 epoch unless --epochs)."),
    RunOption("--epochs", click.FloatRange(0, min_open=True), "Epochs instead of --steps."),
    RunOption("--batch-size", click.IntRange(1), f"[default: {D.batch_size}]"),
    RunOption("--lr", click.FloatRange(0), f"Peak learning rate.  [default: {D.lr}]"),
    RunOption("--momentum", click.FloatRange(0, 1), f"SGD momentum.  [default: {D.momentum}]"),
    RunOption("--weight-decay", click.FloatRange(0), f"[default: {D.weight_decay}]"),
    RunOption("--optimizer", click.Choice(["sgd", "adam"]), f"[default: {D.optimizer}]"),
    RunOption("--decay-skip", click.Choice(["marked", "norm-bias", "none"]),
              "Parameters weight decay skips: those a norm marks (no_weight_decay()), timm's convention (every "
              f"norm parameter and bias), or none.  [default: {D.decay_skip}]"),
    RunOption("--schedule", click.Choice(["constant", "cosine", "step"]),
              f"Learning-rate schedule (step: ×0.1 at 50% and 75%).  [default: {D.schedule}]"),
    RunOption("--augment", "bool", "Random crop + flip on the device (off by default, as in the paper)."),
    RunOption("--seed", int, f"[default: {D.seed}]"),
    RunOption("--device", str, "auto, cpu, cuda or cuda:N.  [default: auto]"),
    RunOption("--amp", click.Choice(["auto", "bf16", "fp16", "off"]),
              "Mixed precision.  [default: auto = bf16 on CUDA, off on CPU]"),
    RunOption("--channels-last", "bool", "[default: on for CUDA, off on CPU]"),
    RunOption("--compile", str,
              "torch.compile the model; optional mode: default, reduce-overhead (CUDA graphs), max-autotune."),
    RunOption("--preset", str, "Named settings, e.g. santurkar2018 (explicit options still win)."),
    RunOption("--log-every", click.IntRange(1), f"Steps per logged training record.  [default: {D.log_every}]"),
    RunOption("--eval-every", click.IntRange(1), "Steps between test evaluations.  [default: once per epoch]"),
    RunOption("--divergence-factor", click.FloatRange(1, min_open=True),
              f"Stop as diverged when the loss exceeds this multiple of the first loss.  "
              f"[default: {D.divergence_factor:g}]"),
]


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The ``run`` options as click decorators (``--compile`` alone may be given without a mode)."""
    for option in reversed(RUN_OPTIONS):
        if option.type == "bool":
            name = option.flag.removeprefix("--")
            decorator = click.option(f"--{name}/--no-{name}", default=None, help=option.help)
        elif option.flag == "--compile":
            decorator = click.option("--compile", "compile", is_flag=False, flag_value="default", default=None,
                                     help=option.help)
        else:
            decorator = click.option(option.flag, type=option.type, help=option.help)
        command = decorator(command)
    return command


@cli.command(epilog=RUN_EPILOG)
@run_options
@click.option("--probe", "probes", multiple=True, help="Probe spec, repeatable (see 'normzoo probes').")
@click.option("--log", "loggers", multiple=True,
              help="Experiment tracker, repeatable: tensorboard, wandb (offline; wandb:mode=online to upload), "
                   "or a plugin's (see 'normzoo loggers'). metrics.jsonl is written either way.")
@click.option("--out", help=f"Parent folder of run directories.  [default: {D.out}]")
@click.option("--run-name", help="Name of the run directory.  [default: <time>-<backbone>-<norm>-s<seed>]")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue a run directory from its last checkpoint (a finished run: only with a larger --steps).")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out/--run-name (it is refused "
                                                "otherwise).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Options from a TOML run file (keys as the options, at the top level or under [run]) or a run "
                   "folder's config.json; options given here win.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary table; print only the run directory.")
def run(resume_dir: str | None, overwrite: bool, config_file: str | None, quiet: bool, probes: tuple[str, ...],
        loggers: tuple[str, ...], **options: Any) -> None:
    """Train a backbone with a norm on a dataset into a run directory.

    Writes config.json, metrics.jsonl, summary.csv and last/best.safetensors checkpoints. Ctrl-C (or SIGTERM)
    finishes the current step, saves and prints how to resume. A run whose loss explodes stops with status
    'diverged' and exit code 0. An existing run folder is never reused silently: --resume continues it,
    --overwrite replaces it; a folder another process is writing is refused, naming that process.
    """
    from normzoo import runner
    from normzoo.config import RunConfig, apply_preset

    explicit = {k: v for k, v in options.items() if v is not None}
    if probes:
        explicit["probes"] = list(probes)
    if loggers:
        explicit["loggers"] = list(loggers)
    if resume_dir:
        if overwrite or config_file:
            raise NormzooError(f"{'--overwrite' if overwrite else '--config'} starts a run; it does not go with "
                               "--resume (which continues the run's own config)")
        result = runner.resume(resume_dir, quiet=quiet, **explicit)
    else:
        if config_file:
            from normzoo.experiment import read_run_file

            from_file = read_run_file(config_file)
            if "steps" in explicit or "epochs" in explicit:  # the length given here replaces the file's
                from_file = {k: v for k, v in from_file.items() if k not in ("steps", "epochs")}
            explicit = {**from_file, **explicit}
        preset = explicit.pop("preset", None)
        values = apply_preset(preset, explicit) if preset else explicit
        result = runner.train(RunConfig(**values), quiet=quiet, overwrite=overwrite)
    if result.main:  # under torchrun, rank 0 speaks for the run
        print_result(result, quiet)


def print_result(result: Any, quiet: bool) -> None:
    s = result.summary
    if s.get("already"):
        what = (f"diverged at step {s.get('diverged_step')}; resuming would train into the same divergence"
                if result.status == "diverged" else
                f"is already finished at step {s['step']}; nothing to do (a larger --steps trains on)")
        click.echo(f"{result.run_dir} {what}", err=True)
    if quiet:
        click.echo(result.run_dir)
    else:
        from normzoo.rundir import SHOWN_FIELDS

        rows = [{"key": k, "value": _fmt(s.get(k))} for k in SHOWN_FIELDS if s.get(k) is not None]
        click.echo(format_table(rows, ["key", "value"]))
    if result.status == "diverged" and not s.get("already"):
        click.echo(f"Diverged at step {s['diverged_step']} (loss not finite or above the divergence factor).",
                   err=True)
    if result.status == "interrupted":
        click.echo(f"Interrupted at step {s['step']}; checkpoint saved. Resume with:\n"
                   f"  normzoo run --resume {result.run_dir}", err=True)
        raise SystemExit(130)


def without_download(spec: str) -> str:
    """``spec`` with ``download=false`` when its dataset has that parameter (eval and inspect never fetch)."""
    from normzoo.plugins import registry

    parsed = registry("datasets").parse(spec)
    args = tuple((key, False if key == "download" else value) for key, value in parsed.args)
    return dataclasses.replace(parsed, args=args).canonical()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--dataset", help="Dataset spec (default: the one the checkpoint was trained on).")
@click.option("--data-dir", help="Where datasets are found.")
@click.option("--download", is_flag=True, help="Let the dataset download its files when they are missing "
                                               "(eval never downloads otherwise).")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=512, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_command(checkpoint: str, dataset: str | None, data_dir: str | None, download: bool, device: str,
                 batch_size: int, as_json: bool) -> None:
    """Evaluate a checkpoint's test loss and accuracy.

    \b
    Example:
      normzoo eval runs/<run>/best.safetensors --dataset fashion-mnist
    """
    import torch.nn.functional as F

    from normzoo.checkpoint import load_checkpoint
    from normzoo.data import load_dataset
    from normzoo.evaluate import evaluate
    from normzoo.runner import resolve_device

    target = resolve_device(device)
    model, info = load_checkpoint(checkpoint, device=target)
    spec = dataset or info.get("dataset") or "cifar10"
    data = load_dataset(spec if download else without_download(spec), data_dir=data_dir)
    if data.num_classes != info.get("num_classes", data.num_classes):
        raise NormzooError(f"dataset has {data.num_classes} classes but the checkpoint was trained for "
                           f"{info['num_classes']}")
    if data.input_shape[0] != info["in_chans"]:
        raise NormzooError(f"dataset {data.name} has {data.input_shape[0]}-channel inputs {list(data.input_shape)} "
                           f"but the checkpoint's model takes {info['in_chans']} channel(s)")
    classification = data.task == "classification"
    metrics = evaluate(model, model, data.test_x.to(target), data.test_y.to(target),
                       F.cross_entropy if classification else F.mse_loss, batch_size=batch_size,
                       classification=classification)
    metrics = {"checkpoint": checkpoint, "dataset": data.name, "examples": len(data.test_y), **metrics}
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        click.echo(format_table([{"key": k, "value": _fmt(v)} for k, v in metrics.items()], ["key", "value"]))


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def inspect(checkpoint: str, as_json: bool) -> None:
    """Print a checkpoint's metadata (backbone, norm, dataset, versions) without loading the weights."""
    from normzoo.checkpoint import read_checkpoint_info

    info = read_checkpoint_info(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        rows = [{"key": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)}
                for k, v in info.items()]
        click.echo(format_table(rows, ["key", "value"]))
