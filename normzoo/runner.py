"""The training runner: set up, then one visible loop (batch, forward, loss, backward, step, log).

Data lives on the device as tensors; a batch is an index slice of a per-epoch permutation derived from the
seed, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import nn

from normzoo.config import RunConfig
from normzoo.distributed import Replicas, local_statistics
from normzoo.errors import (NormzooError, PluginError, RunFailed, describe_error, describe_os_error,
                            is_out_of_memory)
from normzoo.evaluate import evaluate
from normzoo.lock import RunLock
from normzoo.loggers import Loggers
from normzoo.optim import SGD, Adam
from normzoo.probe import Probe, ProbeContext
from normzoo.rundir import RunDir, RunSummary, claim_new_run


STOP_CHECK_EVERY = 10  # steps between the replicas' agreements on a stop request (Ctrl-C, SIGTERM)
RESUME_OVERRIDES = ("steps", "epochs", "device", "loggers")  # all a resume may change: the rest is the run's experiment
PROBE_RECORD_KEYS = frozenset({"type", "probe", "step", "batch_size", "mode", "seconds", "replicas"})


@dataclass
class LoopState:
    """The loop's counters and results so far: saved in every checkpoint, restored by a resume."""

    step: int = 0
    first_loss: float | None = None
    train_loss: float | None = None
    train_acc: float | None = None
    images_per_s: float | None = None
    train_time_s: float = 0.0
    probe_time_s: float = 0.0
    best_test_acc: float | None = None  # the best score so far: test accuracy, or −loss for regression
    best_step: int | None = None
    diverged_step: int | None = None
    test: dict[str, float] = field(default_factory=dict)  # the last evaluation's metrics

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        """From a checkpoint's saved state (older checkpoints lack some fields; unknown ones are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | diverged | interrupted
    summary: dict[str, Any] = field(default_factory=dict)
    main: bool = True  # False on data-parallel replicas other than rank 0, which write and print nothing


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and returns (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # Only the same signal twice aborts: torchrun follows a terminal's Ctrl-C with its own SIGTERM.
        if self.signum == signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                # A signal ignored by whoever started the process stays ignored (as shells do): a SLURM job has its
                # run ignore the SIGTERM that SLURM sends every process, and passes the stop on as one SIGINT.
                if signal.getsignal(sig) != signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    """Seed torch (every device), Python's ``random`` and numpy's global generator: plugins may use any of them,
    and the checkpoint saves all three, so a resumed run continues each stream where it left off."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NormzooError(f"--device must be auto, cpu or cuda[:n], got '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NormzooError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def lr_at(config: RunConfig, step: int, total: int) -> float:
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    if config.schedule == "step":  # ×0.1 at 50 % and 75 % of training
        return config.lr * 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))
    return config.lr


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer, with the parameters that skip weight decay (``--decay-skip``) in a group of their own."""
    skip = no_decay_parameters(model, config.decay_skip)
    decay = [p for p in model.parameters() if id(p) not in skip]
    # One group when nothing is skipped: the optimizer state then has exactly the layout of earlier runs.
    params: Any = model.parameters() if not skip else [
        {"params": decay}, {"params": [p for p in model.parameters() if id(p) in skip], "weight_decay": 0.0}]
    if config.optimizer == "adam":
        return Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def no_decay_parameters(model: nn.Module, rule: str) -> set[int]:
    """``id``s of the parameters weight decay skips under ``rule``.

    ``marked``: those a module names in its ``no_weight_decay()`` (its own parameter names, timm's convention for
    models, here for any module: a norm marks its own). ``norm-bias``: timm's convention for the rest as well, every
    parameter of one dimension or fewer (norm scales and shifts) and every bias. ``none``: decay everything.
    """
    if rule == "none":
        return set()
    skip: set[int] = set()
    for module in model.modules():
        marked = getattr(module, "no_weight_decay", None)
        names = set(marked()) if callable(marked) else set()
        for name, param in module.named_parameters(recurse=False):
            if name in names or (rule == "norm-bias" and (param.ndim <= 1 or name == "bias")):
                skip.add(id(param))
    return skip


def autocast_for(config: RunConfig, device: torch.device) -> tuple[Any, torch.dtype | None]:
    """The autocast context factory and dtype for ``--amp`` (auto: bf16 on CUDA, off on CPU)."""
    amp = config.amp if config.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    if amp == "off":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


def epoch_permutation(seed: int, epoch: int, train_size: int) -> torch.Tensor:
    """The seeded order of epoch ``epoch`` (CPU generator: the same on every device)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(train_size, generator=generator)


class BatchSampler:
    """Indices of each step's batch: a slice of the seeded permutation of its epoch (drop-last).

    Each epoch's permutation is made once and kept on the training device: one host-to-device copy per epoch, where
    a copy per step would stall the GPU queue every step. The order depends only on the seed and the step, so a
    resumed run draws the batches the uninterrupted run would have.
    """

    def __init__(self, seed: int, train_size: int, batch_size: int, device: torch.device) -> None:
        self.seed, self.train_size, self.batch_size, self.device = seed, train_size, batch_size, device
        self.epoch, self.permutation = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.train_size // self.batch_size)
        if epoch != self.epoch:
            self.epoch = epoch
            self.permutation = epoch_permutation(self.seed, epoch, self.train_size).to(self.device)
        return self.permutation[position * self.batch_size:(position + 1) * self.batch_size]


class Trainer:
    """Holds the pieces of one run; :meth:`fit` is the loop.

    A new run (``run_dir=None``) claims a fresh folder in ``config.out`` before any slow work, so a name that is
    taken is refused at once; ``run_dir`` continues that (claimed) run. The caller's ``config`` is not changed:
    the trainer works on a validated copy whose specs are canonical.
    """

    def __init__(self, config: RunConfig, *, run_dir: str | Path | None = None, quiet: bool = False,
                 overwrite: bool = False) -> None:
        from normzoo.plugins import registry

        config = dataclasses.replace(config, probes=list(config.probes))
        config.validate()
        for kind, spec in [("norms", config.norm), ("backbones", config.backbone), ("datasets", config.dataset),
                           *[("probes", p) for p in config.probes], *[("loggers", g) for g in config.loggers]]:
            registry(kind).parse(spec)  # every spec error before anything is written or loaded
        config.backbone = registry("backbones").parse(config.backbone).canonical()
        config.norm = registry("norms").parse(config.norm).canonical()
        config.dataset = registry("datasets").parse(config.dataset).canonical()
        self.config = config
        self.replicas, self.device = Replicas.join(resolve_device(config.device))
        self.replicas.check_batch_size(config.batch_size)
        self.quiet = quiet or not self.replicas.is_main
        self.loggers = Loggers(config.loggers if self.replicas.is_main else [])  # a missing tracker: before writing
        self.resuming = run_dir is not None
        self.lock: RunLock | None = None
        self.created = False
        name = config.run_name or RunDir.new_name(config.backbone.split(",")[0],
                                                  registry("norms").parse(config.norm).short(), config.seed)
        if run_dir is not None:
            self.run = RunDir(run_dir)
            if self.replicas.is_main:
                self.lock = self.run.claim()
        elif self.replicas.is_main:
            self.run, self.lock, self.created = claim_new_run(config.out, name, unique=config.run_name is None,
                                                              overwrite=overwrite)
        else:  # replicas other than rank 0 never write; rank 0 may have added a suffix to this name
            self.run = RunDir(Path(config.out) / name)
        self.state = LoopState()
        self.progressed = False  # whether this session trained a step (a failure before that undoes the folder)
        try:
            self._setup()
        except BaseException:
            self.abandon()
            raise

    def _setup(self) -> None:
        from normzoo.data import augment, load_dataset
        from normzoo.models import build_model
        from normzoo.plugins import registry

        config = self.config
        seed_everything(config.seed)
        self.augment = augment
        self.data = load_dataset(config.dataset, data_dir=config.data_dir)
        if len(self.data.train_y) < config.batch_size:
            raise NormzooError(f"--batch-size {config.batch_size} exceeds the {len(self.data.train_y)} training "
                               f"examples of {config.dataset}")
        self.classification = self.data.task == "classification"
        check_norm_output(config.norm, self.device)
        model = build_model(config.backbone, config.norm, num_classes=self.data.num_classes,
                            in_chans=self.data.input_shape[0])
        note = unsynced_norm_note(config.norm, self.replicas.world_size, config.batch_size)
        if note and self.replicas.is_main:
            print(note, file=sys.stderr)
        self.probes: list[Probe] = [registry("probes").build(spec) for spec in config.probes]
        self.probe_names = [registry("probes").parse(spec).family for spec in config.probes]

        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.memory_format = memory_format = \
            torch.channels_last if self.channels_last and len(self.data.input_shape) == 3 else None
        self.model = model.to(self.device, memory_format=memory_format) if memory_format else model.to(self.device)
        self.train_x = self._to_device(self.data.train_x, memory_format)
        self.train_y = self.data.train_y.to(self.device)
        self.test_x = self._to_device(self.data.test_x, memory_format)
        self.test_y = self.data.test_y.to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.autocast, amp_dtype = autocast_for(config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype is torch.float16)
        self.eval_forward = torch.compile(self.model, mode=config.compile) if config.compile else self.model
        self.forward = self.eval_forward
        if self.replicas.active:  # the training forward all-reduces gradients; evaluation (rank 0 alone) must not
            ddp = nn.parallel.DistributedDataParallel(self.model)
            self.forward = torch.compile(ddp, mode=config.compile) if config.compile else ddp
        # CUDA graphs reuse their output buffers: each training step must be marked as a new one.
        self.cudagraph_steps = bool(config.compile) and "reduce-overhead" in config.compile
        self.loss_fn = F.cross_entropy if self.classification else F.mse_loss
        self.total = config.total_steps(len(self.train_y))
        self.eval_every = config.eval_every or len(self.train_y) // config.batch_size

    def log(self, record: dict[str, Any]) -> None:
        """One record to ``metrics.jsonl`` (rank 0 writes, as for every file of the run), then to the trackers."""
        if self.replicas.is_main:
            self.run.log(record)
            self.loggers.log(record)

    # -- the run folder ----------------------------------------------------------------------------------------
    def abandon(self) -> None:
        """After a failure before this session's first step: a new run's folder goes (the run never started),
        a resumed one is left as it was; the lock is released either way."""
        if self.lock is None:
            return
        if not self.resuming and not self.progressed:
            self.run.remove_run_files()
        self.lock.release()
        self.lock = None
        if self.created:
            with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                self.run.path.rmdir()

    def fail(self, exc: BaseException) -> None:
        """Record that the run failed after training (best effort: the disk may be what failed)."""
        if self.replicas.is_main and self.lock is not None:
            message = describe_error(exc)[0]
            with contextlib.suppress(OSError):
                self.log({"type": "status", "step": self.state.step, "status": "failed", "error": message})
                self.run.write_summary(self.summary("failed"))
            self.lock.release()
            self.lock = None

    def _to_device(self, x: torch.Tensor, memory_format: Any) -> torch.Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=memory_format) if memory_format else x

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_info(self) -> dict[str, Any]:
        return {"dataset": self.config.dataset, "classes": list(self.data.classes),
                "input_shape": list(self.data.input_shape), "task": self.data.task, "step": self.state.step,
                "run": self.run.path.name, **{f"test_{k}": v for k, v in self.state.test.items()}}

    def save(self) -> None:
        """``last.safetensors``: weights and the whole training state in one file, one atomic rename."""
        from normzoo.checkpoint import save_checkpoint
        from normzoo.state import training_state_parts

        state = training_state_parts(self.optimizer, extra={**dataclasses.asdict(self.state),
                                                            "scaler": self.scaler.state_dict()})
        save_checkpoint(self.run.last, self.model, info=self.checkpoint_info(), training_state=state)
        self.run.legacy_state.unlink(missing_ok=True)  # the older two-file layout, now superseded

    def save_best(self) -> None:
        from normzoo.checkpoint import save_checkpoint

        save_checkpoint(self.run.best, self.model, info=self.checkpoint_info())

    def resume(self) -> None:
        from normzoo.checkpoint import load_run_checkpoint, load_weights
        from normzoo.state import load_training_state

        if not self.run.has_checkpoint():
            raise NormzooError(f"{self.run.path} has no checkpoint to resume from (the run stopped before its "
                               f"first evaluation); start it again with --overwrite")
        if self.run.legacy_state.exists():  # written by an older normzoo as two files
            info = load_weights(self.run.last, self.model)
            extra = load_training_state(self.run.legacy_state, self.optimizer)
            if info.get("step") != extra.get("step"):
                raise NormzooError(f"the checkpoint files of {self.run.path} disagree (weights at step "
                                   f"{info.get('step')}, training state at step {extra.get('step')}): a crash "
                                   "between writing them; the run cannot continue exactly, so start it again with "
                                   "--overwrite")
        else:
            info, extra = load_run_checkpoint(self.run.last, self.model, self.optimizer)
        scaler = extra.pop("scaler", None)
        if scaler:
            self.scaler.load_state_dict(scaler)
        self.state = LoopState.from_dict(extra)
        if info.get("step") != self.state.step:
            raise NormzooError(f"checkpoint {self.run.last} is inconsistent: its weights say step "
                               f"{info.get('step')}, its loop state step {self.state.step}")
        self.replicas.broadcast_rng(self.device)  # CUDA states were saved for rank 0's device only

    def reconcile_best(self) -> None:
        """A crash between the last checkpoint and the best one: the weights just loaded are the best."""
        from normzoo.checkpoint import read_checkpoint_info

        best_step = read_checkpoint_info(self.run.best).get("step") if self.run.best.exists() else None
        if self.state.best_step == self.state.step and best_step != self.state.step:
            self.save_best()

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train to ``total`` steps (from the checkpoint when resuming); the lock is released at the end.

        A failure before this session's first step undoes a new run's folder (:meth:`abandon`); a later one is
        recorded as status ``failed`` with the error (:meth:`fail`), the last checkpoint kept for ``--resume``.
        """
        try:
            return self._fit()
        except KeyboardInterrupt:  # a second Ctrl-C: abort; the last checkpoint stays the run's state
            self.abandon() if not self.progressed else None
            raise
        except BaseException as exc:
            self.fail(exc) if self.progressed else self.abandon()
            if isinstance(exc, OSError):  # a full or read-only disk: say which run it hit
                message, code = describe_os_error(exc)
                failure = RunFailed(f"run {self.run.path}: {message}")
                failure.exit_code = code
                raise failure from exc
            raise
        finally:
            self.loggers.close()
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            self.replicas.close()

    def _fit(self) -> RunResult:
        from tqdm.auto import tqdm

        if self.resuming:
            self.resume()
            if self.state.step >= self.total or self.run.read_summary().get("status") == "diverged":
                return self.already_done()
            if self.replicas.is_main:
                self.run.truncate_log(self.state.step)
                self.reconcile_best()
        elif self.replicas.is_main:
            self.run.create(self.config.to_dict())
        self.loggers.open(self.run.path, self.config.to_dict(), self.state.step)
        if self.replicas.active:
            self.log({"type": "replicas", "step": self.state.step, "world_size": self.replicas.world_size,
                      "backend": dist.get_backend()})
        model, opt, cfg, state = self.model, self.optimizer, self.config, self.state
        # Piped to a log file, redraw every 30 s instead of every step so the log stays readable.
        bar = tqdm(total=self.total, initial=state.step, disable=self.quiet, unit="step",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        window_loss = torch.zeros((), device=self.device)
        window_correct = torch.zeros((), device=self.device, dtype=torch.long)
        window_start, window_steps, status = time.perf_counter(), 0, "running"
        self.window_probe_s = 0.0
        sampler = BatchSampler(cfg.seed, len(self.train_y), cfg.batch_size, self.device)
        model.train()
        with StopRequest() as stop:
            while state.step < self.total:
                step = state.step
                idx = sampler(step)
                x, y = self.train_x[idx], self.train_y[idx]
                if cfg.augment:  # the whole batch on every replica: per-sample draws as in one process
                    x = self.augment(x)
                    if self.memory_format is not None:
                        x = x.contiguous(memory_format=self.memory_format)
                x, y = self.replicas.share(x), self.replicas.share(y)
                lr = lr_at(cfg, step, self.total)
                if lr != opt.param_groups[0]["lr"]:
                    for group in opt.param_groups:
                        group["lr"] = lr
                if self.probes and self.replicas.is_main:
                    self.run_probes(x, y, lr, step)
                if self.cudagraph_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    out = self.forward(x)
                    loss = self.loss_fn(out.float(), y)
                self.scaler.scale(loss).backward()
                self.scaler.step(opt)
                self.scaler.update()
                opt.zero_grad(set_to_none=True)
                state.step = step = step + 1
                self.progressed = True
                window_loss += loss.detach()
                if self.classification:
                    window_correct += (out.detach().argmax(1) == y).sum()
                window_steps += 1
                bar.update(1)
                stopping = self.stop_now(stop, step)
                if step % cfg.log_every == 0 or step == self.total or stopping:
                    self.sync()  # the window's time must include the GPU work still queued
                    train_seconds = time.perf_counter() - window_start - self.window_probe_s
                    status = self.log_window(step, window_loss, window_correct, window_steps, train_seconds, bar)
                    window_loss.zero_(), window_correct.zero_()
                    window_start, window_steps, self.window_probe_s = time.perf_counter(), 0, 0.0
                    if status == "diverged":
                        break
                if step % self.eval_every == 0 or step == self.total or stopping:
                    self.sync()  # training work still queued belongs to the training window
                    eval_start = time.perf_counter()
                    self.evaluate_and_save(step)
                    # Training windows exclude evaluation and checkpointing, as they exclude probes: an evaluation
                    # right after a logged window used to be timed as training in the next one.
                    self.window_probe_s += time.perf_counter() - eval_start
                if stopping:
                    status = "interrupted"
                    break
        bar.close()
        if status == "running":
            status = "finished"
        return self.finish(status)

    def already_done(self) -> RunResult:
        """Resuming a run that reached its last step (or diverged) changes nothing and says what it has."""
        status = self.run.read_summary().get("status")
        if status not in ("finished", "diverged"):
            status = "finished"
            if self.replicas.is_main:  # it saved its last checkpoint but was stopped before its summary
                self.run.truncate_log(self.state.step)
                self.finish(status)
        summary = {**dataclasses.asdict(self.summary(status)), "already": True}
        if status == "diverged":
            summary["diverged_step"] = self.run.read_summary().get("diverged_step")
        return RunResult(self.run.path, status, summary, main=self.replicas.is_main)

    def run_probes(self, x: torch.Tensor, y: torch.Tensor, lr: float, step: int) -> None:
        from normzoo.plugins import registry

        due = [(name, probe) for name, probe in zip(self.probe_names, self.probes) if probe.due(step, self.total)]
        if not due:
            return
        context = ProbeContext(self.model, self.loss_fn, x, y, self.optimizer, lr, step, self.total,
                               train_inputs=self.train_x, train_targets=self.train_y)
        scope = {"replicas": self.replicas.describe(len(y))} if self.replicas.active else {}
        for name, probe in due:
            self.sync()
            start = time.perf_counter()
            origin = registry("probes").get(name).origin
            # Probes draw random numbers of their own; forking keeps the training stream (and the replicas) in step.
            try:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                        local_statistics():
                    values = probe.measure(context)
            except NormzooError:
                raise
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                raise PluginError(f"probe '{name}' ({origin}) raised at step {step}: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:300]}") from exc
            check_probe_values(name, origin, values)
            self.sync()
            elapsed = time.perf_counter() - start
            self.log({"type": "probe", "probe": name, "step": step, "batch_size": len(y),
                      "mode": "train" if self.model.training else "eval", "seconds": elapsed, **values, **scope})
            self.state.probe_time_s += elapsed
            self.window_probe_s += elapsed  # training time and images/s exclude the probes

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stop_now(self, stop: StopRequest, step: int) -> bool:
        """Whether to save and stop after ``step``; replicas must all stop at the same step."""
        requested = stop.signum is not None
        if not self.replicas.active:
            return requested
        # Agreeing costs a collective and a device sync, so replicas compare notes every few steps only.
        if step % STOP_CHECK_EVERY and step % self.config.log_every and step != self.total:
            return False
        return self.replicas.any(requested, self.device)

    def log_window(self, step: int, loss_sum: torch.Tensor, correct: torch.Tensor, steps: int,
                   seconds: float, bar: Any) -> str:
        loss_sum, correct = self.replicas.sum(loss_sum, correct)  # global batch figures on every replica
        loss = loss_sum.item() / (steps * self.replicas.world_size)
        acc = correct.item() / (steps * self.config.batch_size) if self.classification else None
        state = self.state
        state.train_time_s += seconds
        first = state.first_loss = state.first_loss or loss
        record = {"type": "train", "step": step, "loss": loss, "acc": acc, "lr": lr_at(self.config, step - 1,
                  self.total), "images_per_s": steps * self.config.batch_size / max(seconds, 1e-9)}
        self.log(record)
        state.train_loss, state.train_acc, state.images_per_s = loss, acc, record["images_per_s"]
        bar.set_postfix(loss=f"{loss:.4f}", **({"acc": f"{acc:.3f}"} if acc is not None else {}),
                        img_s=f"{record['images_per_s']:.0f}", refresh=False)
        if not math.isfinite(loss) or loss > self.config.divergence_factor * first:
            state.diverged_step = step
            self.log({"type": "diverged", "step": step, "loss": loss})
            return "diverged"
        return "running"

    def evaluate_and_save(self, step: int) -> None:
        """Evaluate, then checkpoint: ``last`` (with the updated best in its state) first, then ``best``."""
        if not self.replicas.is_main:  # replicas hold identical weights: rank 0 evaluates and writes
            return
        with self.autocast():
            test = evaluate(self.eval_forward, self.model, self.test_x, self.test_y, self.loss_fn,
                            batch_size=max(self.config.batch_size, 256), classification=self.classification)
        self.log({"type": "eval", "step": step, **test})
        state = self.state
        state.test = test
        score = test.get("acc", -test["loss"])
        if state.best_test_acc is None or score > state.best_test_acc:
            state.best_test_acc, state.best_step = score, step
        self.save()
        if state.best_step == step:
            self.save_best()

    def summary(self, status: str) -> RunSummary:
        state, cfg = self.state, self.config
        return RunSummary(
            run=str(self.run.path), backbone=cfg.backbone, norm=cfg.norm, dataset=cfg.dataset, seed=cfg.seed,
            lr=cfg.lr, batch_size=cfg.batch_size, status=status, step=state.step, total_steps=self.total,
            diverged_step=state.diverged_step, train_loss=state.train_loss, train_acc=state.train_acc,
            test_loss=state.test.get("loss"), test_acc=state.test.get("acc"),
            best_test_acc=state.best_test_acc if self.classification else None, best_step=state.best_step,
            train_time_s=state.train_time_s, probe_time_s=state.probe_time_s, images_per_s=state.images_per_s,
            world_size=self.replicas.world_size)

    def finish(self, status: str) -> RunResult:
        summary = self.summary(status)
        if not self.replicas.is_main:
            return RunResult(self.run.path, status, dataclasses.asdict(summary), main=False)
        self.log({"type": "status", "step": self.state.step, "status": status})
        self.run.write_summary(summary)
        return RunResult(self.run.path, status, dataclasses.asdict(summary))


def check_probe_values(name: str, origin: str, values: Any) -> None:
    """A probe's result must be a dict of named JSON values that do not overwrite the record's own fields."""
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise PluginError(f"probe '{name}' ({origin}) returned {type(values).__name__}, not a dict of named values")
    clash = sorted(PROBE_RECORD_KEYS & set(values))
    if clash:
        raise PluginError(f"probe '{name}' ({origin}) returned the reserved field(s) {', '.join(clash)}")
    try:
        json.dumps(values, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"probe '{name}' ({origin}) returned a value that is not JSON-serialisable: {exc}") \
            from None


def check_norm_output(norm: str, device: torch.device) -> None:
    """A norm must return its input's shape: checked once on a small input, so a broken plugin norm is named
    instead of surfacing as a shape error in the layer after it."""
    from normzoo.norms.base import create_norm
    from normzoo.plugins import registry

    module = create_norm(norm, 4, device=device)
    origin = registry("norms").get(registry("norms").parse(norm).family).origin
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for shape in ((4, 4, 3, 3), (6, 4)):
            x = torch.randn(shape, device=device)
            try:
                out = module.train()(x)
            except Exception as exc:
                if is_out_of_memory(exc) or isinstance(exc, NormzooError):
                    raise
                raise PluginError(f"norm '{norm.split(',')[0]}' ({origin}) failed on a {tuple(shape)} input: "
                                  f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise PluginError(f"norm '{norm.split(',')[0]}' ({origin}) returned {got} for a {tuple(shape)} "
                                  "input; a norm must return a tensor of its input's shape")

def unsynced_norm_note(norm: str, world_size: int, batch_size: int) -> str | None:
    """A warning when data-parallel replicas would each normalize only their own share of the batch."""
    from normzoo.norms.base import create_norm, parse_norm, traits_of

    spec = parse_norm(norm)
    if world_size < 2 or spec.kwargs.get("sync") or not traits_of(create_norm(spec, 2)).batch_dependent:
        return None
    name = spec.short()
    share = batch_size // world_size
    note = f"note: {name} normalizes each replica's {share}-sample share of the {batch_size}-sample batch"
    if "sync" not in spec.kwargs:
        return f"{note} (it has no sync parameter)"
    synced = name + (",sync=true" if ":" in name else ":sync=true")
    return f"{note}; add sync=true to the norm spec (e.g. --norm {synced}) to normalize over the whole batch"


def train(config: RunConfig, *, quiet: bool = False, overwrite: bool = False) -> RunResult:
    """Train ``config`` into a new run folder (``overwrite`` replaces a run already in ``out/run_name``)."""
    return Trainer(config, quiet=quiet, overwrite=overwrite).fit()


def resume(run_dir: str | Path, *, quiet: bool = False, **overrides: Any) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint.

    ``overrides`` may change only the length (``steps`` or ``epochs``: a larger value trains on) and the
    ``device``; everything else is the run's experiment. A run already at its last step, or diverged, is
    left unchanged and reported as it is.
    """
    changed = sorted(k for k, v in overrides.items() if k not in RESUME_OVERRIDES and v is not None)
    if changed:
        raise NormzooError("--resume continues the saved config; only --steps/--epochs/--device/--log may change (got "
                           + ", ".join("--" + k.replace("_", "-") for k in changed) + ")")
    run = RunDir(run_dir)
    if not run.config.exists():
        raise NormzooError(f"{run_dir} is not a run folder (no config.json)")
    if run.last.exists():  # a norm or backbone whose plugin is gone: name the plugin, as eval does
        from normzoo.checkpoint import check_plugins

        check_plugins(run.last)
    config = RunConfig.load(run.config)
    if overrides.get("steps") is not None or overrides.get("epochs") is not None:
        config.steps, config.epochs = overrides.get("steps"), overrides.get("epochs")  # one replaces the other
    for key in ("device", "loggers"):  # where it runs and who watches it are not part of the experiment
        if overrides.get(key) is not None:
            setattr(config, key, overrides[key])
    return Trainer(config, run_dir=run.path, quiet=quiet).fit()
