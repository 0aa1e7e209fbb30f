"""The training runner: set up, then one visible loop (batch, forward, loss, backward, step, log).

Data lives on the device as tensors; a batch is an index slice of a per-epoch permutation derived from the
seed, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
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
from normzoo.errors import NormzooError
from normzoo.evaluate import evaluate
from normzoo.probe import Probe, ProbeContext
from normzoo.rundir import RunDir


STOP_CHECK_EVERY = 10  # steps between the replicas' agreements on a stop request (Ctrl-C, SIGTERM)


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
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


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


def batch_indices(seed: int, step: int, train_size: int, batch_size: int) -> torch.Tensor:
    """Indices of step ``step``'s batch: a slice of the seeded permutation of its epoch (drop-last)."""
    epoch, position = divmod(step, train_size // batch_size)
    return epoch_permutation(seed, epoch, train_size)[position * batch_size:(position + 1) * batch_size]


class BatchSampler:
    """``batch_indices`` with each epoch's permutation made once and kept on the training device.

    One host-to-device copy per epoch: a copy per step would stall the GPU queue every step.
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
    """Holds the pieces of one run; :meth:`fit` is the loop."""

    def __init__(self, config: RunConfig, *, run_dir: Path | None = None, quiet: bool = False) -> None:
        from normzoo.data import augment, load_dataset
        from normzoo.models import build_model
        from normzoo.plugins import registry

        config.validate()
        self.replicas, self.device = Replicas.join(resolve_device(config.device))
        self.replicas.check_batch_size(config.batch_size)
        self.config, self.augment = config, augment
        self.quiet = quiet or not self.replicas.is_main
        torch.manual_seed(config.seed)
        for kind, spec in [("norms", config.norm), ("backbones", config.backbone), ("datasets", config.dataset),
                           *[("probes", p) for p in config.probes]]:
            registry(kind).parse(spec)  # every spec error before any slow work
        self.data = load_dataset(config.dataset, data_dir=config.data_dir)
        if len(self.data.train_y) < config.batch_size:
            raise NormzooError(f"--batch-size {config.batch_size} exceeds the {len(self.data.train_y)} training "
                               f"examples of {config.dataset}")
        self.classification = self.data.task == "classification"
        model = build_model(config.backbone, config.norm, num_classes=self.data.num_classes,
                            in_chans=self.data.input_shape[0])
        config.backbone, config.norm = model.normzoo_config["backbone"], model.normzoo_config["norm"]
        note = unsynced_norm_note(config.norm, self.replicas.world_size, config.batch_size)
        if note and self.replicas.is_main:
            print(note, file=sys.stderr)
        config.dataset = registry("datasets").parse(config.dataset).canonical()
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
        self.run = RunDir(run_dir or Path(config.out) / (config.run_name or RunDir.new_name(
            model.normzoo_config["backbone"].split(",")[0], model.normzoo_config["norm"].split(",")[0],
            config.seed)))
        self.log = self.run.log if self.replicas.is_main else (lambda record: None)
        self.state: dict[str, Any] = {"step": 0, "best_test_acc": None, "best_step": None, "first_loss": None,
                                      "train_time_s": 0.0, "probe_time_s": 0.0, "diverged_step": None}

    def _to_device(self, x: torch.Tensor, memory_format: Any) -> torch.Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=memory_format) if memory_format else x

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_info(self) -> dict[str, Any]:
        return {"dataset": self.config.dataset, "classes": list(self.data.classes),
                "input_shape": list(self.data.input_shape), "task": self.data.task, "step": self.state["step"],
                "run": self.run.path.name}

    def save(self, test_metrics: dict[str, float] | None = None) -> None:
        from normzoo.checkpoint import save_checkpoint
        from normzoo.state import save_training_state

        info = self.checkpoint_info() | (test_metrics or {})
        save_checkpoint(self.run.last, self.model, info=info)
        save_training_state(self.run.last_state, self.optimizer,
                            extra={**self.state, "scaler": self.scaler.state_dict()})

    def resume(self) -> None:
        from normzoo.checkpoint import load_weights
        from normzoo.state import load_training_state

        if not self.run.last_state.exists():
            raise NormzooError(f"{self.run.path} has no last.state.safetensors to resume from")
        load_weights(self.run.last, self.model)
        extra = load_training_state(self.run.last_state, self.optimizer)
        scaler = extra.pop("scaler", None)
        if scaler:
            self.scaler.load_state_dict(scaler)
        self.state.update(extra)
        self.replicas.broadcast_rng(self.device)  # CUDA states were saved for rank 0's device only
        if self.replicas.is_main:
            self.run.truncate_log(self.state["step"])

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self, *, resume: bool = False) -> RunResult:
        try:
            return self._fit(resume)
        finally:
            self.replicas.close()

    def _fit(self, resume: bool) -> RunResult:
        from tqdm.auto import tqdm

        if resume:
            self.resume()
        elif self.replicas.is_main:
            self.run.create(self.config.to_dict())
        if self.replicas.active:
            self.log({"type": "replicas", "step": self.state["step"], "world_size": self.replicas.world_size,
                      "backend": dist.get_backend()})
        model, opt, cfg, state = self.model, self.optimizer, self.config, self.state
        # Piped to a log file, redraw every 30 s instead of every step so the log stays readable.
        bar = tqdm(total=self.total, initial=state["step"], disable=self.quiet, unit="step",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        window_loss = torch.zeros((), device=self.device)
        window_correct = torch.zeros((), device=self.device, dtype=torch.long)
        window_start, window_steps, status, test = time.perf_counter(), 0, "running", {}
        self.window_probe_s = 0.0
        sampler = BatchSampler(cfg.seed, len(self.train_y), cfg.batch_size, self.device)
        model.train()
        with StopRequest() as stop:
            while state["step"] < self.total:
                step = state["step"]
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
                state["step"] = step = step + 1
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
                    test = self.evaluate_and_save(step)
                if stopping:
                    status = "interrupted"
                    break
        bar.close()
        if status == "running":
            status = "finished"
        return self.finish(status, test)

    def run_probes(self, x: torch.Tensor, y: torch.Tensor, lr: float, step: int) -> None:
        due = [(name, probe) for name, probe in zip(self.probe_names, self.probes) if probe.due(step, self.total)]
        if not due:
            return
        context = ProbeContext(self.model, self.loss_fn, x, y, self.optimizer, lr, step, self.total,
                               train_inputs=self.train_x, train_targets=self.train_y)
        scope = {"replicas": self.replicas.describe(len(y))} if self.replicas.active else {}
        for name, probe in due:
            self.sync()
            start = time.perf_counter()
            # Probes draw random numbers of their own; forking keeps the training stream (and the replicas) in step.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                    local_statistics():
                values = probe.measure(context)
            self.sync()
            elapsed = time.perf_counter() - start
            self.log({"type": "probe", "probe": name, "step": step, "batch_size": len(y),
                      "mode": "train" if self.model.training else "eval", "seconds": elapsed, **values, **scope})
            self.state["probe_time_s"] += elapsed
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
        self.state["train_time_s"] += seconds
        first = self.state["first_loss"] = self.state["first_loss"] or loss
        record = {"type": "train", "step": step, "loss": loss, "acc": acc, "lr": lr_at(self.config, step - 1,
                  self.total), "images_per_s": steps * self.config.batch_size / max(seconds, 1e-9)}
        self.log(record)
        self.state.update(train_loss=loss, train_acc=acc, images_per_s=record["images_per_s"])
        bar.set_postfix(loss=f"{loss:.4f}", **({"acc": f"{acc:.3f}"} if acc is not None else {}),
                        img_s=f"{record['images_per_s']:.0f}", refresh=False)
        if not math.isfinite(loss) or loss > self.config.divergence_factor * first:
            self.state["diverged_step"] = step
            self.log({"type": "diverged", "step": step, "loss": loss})
            return "diverged"
        return "running"

    def evaluate_and_save(self, step: int) -> dict[str, float]:
        if not self.replicas.is_main:  # replicas hold identical weights: rank 0 evaluates and writes
            return {}
        with self.autocast():
            test = evaluate(self.eval_forward, self.model, self.test_x, self.test_y, self.loss_fn,
                            batch_size=max(self.config.batch_size, 256), classification=self.classification)
        self.log({"type": "eval", "step": step, **test})
        metrics = {f"test_{k}": v for k, v in test.items()}
        self.save(metrics)
        score = test.get("acc", -test["loss"])
        best = self.state["best_test_acc"]
        if best is None or score > best:
            self.state.update(best_test_acc=score, best_step=step)
            from normzoo.checkpoint import save_checkpoint

            save_checkpoint(self.run.best, self.model, info=self.checkpoint_info() | metrics)
        return test

    def finish(self, status: str, test: dict[str, float]) -> RunResult:
        state, cfg = self.state, self.config
        summary = {
            "run": str(self.run.path), "backbone": cfg.backbone, "norm": cfg.norm, "dataset": cfg.dataset,
            "seed": cfg.seed, "lr": cfg.lr, "batch_size": cfg.batch_size, "status": status, "step": state["step"],
            "total_steps": self.total, "diverged_step": state["diverged_step"],
            "train_loss": state.get("train_loss"), "train_acc": state.get("train_acc"),
            "test_loss": test.get("loss"), "test_acc": test.get("acc"),
            "best_test_acc": state["best_test_acc"] if self.classification else None,
            "best_step": state["best_step"], "train_time_s": state["train_time_s"],
            "probe_time_s": state["probe_time_s"], "images_per_s": state.get("images_per_s"),
            "world_size": self.replicas.world_size,
        }
        if not self.replicas.is_main:
            return RunResult(self.run.path, status, summary, main=False)
        self.log({"type": "status", "step": state["step"], "status": status})
        self.run.write_summary(summary)
        return RunResult(self.run.path, status, summary)


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


def train(config: RunConfig, *, quiet: bool = False) -> RunResult:
    """Train ``config`` into a new run directory."""
    return Trainer(config, quiet=quiet).fit()


def resume(run_dir: str | Path, *, quiet: bool = False, **overrides: Any) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint (``overrides`` may extend ``steps``, say)."""
    run = RunDir(run_dir)
    config = RunConfig.load(run.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return Trainer(config, run_dir=run.path, quiet=quiet).fit(resume=True)
