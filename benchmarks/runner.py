"""normzoo's training step vs a bare hand-written PyTorch loop: images/s, in one process.

    python benchmarks/runner.py                      # CPU: vgg11 (width 0.5) on fashion-mnist-mini, batch 128
    python benchmarks/runner.py --device cuda        # adds vgg11/CIFAR-shape bf16 + channels_last (+compile)

Both loops train the same architecture on the same device-resident data with the same batches. Each loop is
built (and compiled) once, runs one untimed window of warm-up (compilation, CUDA graph recording), then
``rounds`` timed windows of ``steps`` steps: the bare loop's rounds, then normzoo's, the images/s of each
normzoo window read from the run's own log (the final evaluation untimed). Compiled rows are therefore medians
of several windows, not one sample of a freshly compiled model. Goal: ratio ≥ 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from normzoo.config import RunConfig
from normzoo.data import load_dataset
from normzoo.models import build_model
from normzoo.rundir import RunDir
from normzoo.runner import BatchSampler, Trainer


class BareLoop:
    """The loop a researcher would write by hand, built and compiled once and timed in rounds."""

    def __init__(self, backbone: str, norm: str, data, batch_size: int, device: torch.device, channels_last: bool,
                 amp: bool, compile_mode: str | None) -> None:
        torch.manual_seed(0)
        model = build_model(backbone, norm, num_classes=data.num_classes, in_chans=data.input_shape[0]).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.x_all = data.train_x.to(device).contiguous(memory_format=fmt)
        self.y_all = data.train_y.to(device)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.forward = torch.compile(model, mode=compile_mode) if compile_mode else model
        self.cudagraphs = compile_mode == "reduce-overhead"
        self.sampler = BatchSampler(0, len(self.y_all), batch_size, device)  # the run's batches, permuted on device
        self.device, self.amp, self.batch_size, self.steps_done = device, amp, batch_size, 0

    def step(self) -> None:
        idx = self.sampler(self.steps_done)
        x, y = self.x_all[idx], self.y_all[idx]
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = F.cross_entropy(self.forward(x).float(), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps_done += 1

    def round(self, steps: int) -> float:
        """Images/s over ``steps`` steps."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


def normzoo_windows(backbone: str, norm: str, dataset: str, steps: int, rounds: int, batch_size: int, device: str,
                    channels_last: bool, amp: bool, compile_mode: str | None, out: str) -> list[float]:
    """normzoo's Trainer over ``rounds + 1`` windows of ``steps`` steps; images/s of each window but the first."""
    config = RunConfig(backbone=backbone, norm=norm, dataset=dataset, steps=(rounds + 1) * steps,
                       batch_size=batch_size, lr=0.05, device=device, channels_last=channels_last,
                       amp="bf16" if amp else "off", compile=compile_mode, log_every=steps, eval_every=10**9, out=out,
                       schedule="constant")
    trainer = Trainer(config, quiet=True)
    trainer.eval_forward = trainer.model  # the final evaluation is not timed: spare it a compilation
    result = trainer.fit()
    windows = [r["images_per_s"] for r in RunDir(result.run_dir).read_log() if r["type"] == "train"]
    return windows[1:]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(label: str, backbone: str, norm: str, dataset: str, steps: int, batch_size: int, device: str,
            rounds: int, channels_last: bool = False, amp: bool = False, compile_mode: str | None = None) -> dict:
    """Median images/s of both loops over ``rounds`` windows each, and normzoo / bare; printed and returned."""
    if compile_mode:  # each loop compiles afresh, never hitting a recompile limit and falling back to eager
        torch._dynamo.reset()
    loop = BareLoop(backbone, norm, load_dataset(dataset), batch_size, torch.device(device), channels_last, amp,
                    compile_mode)
    loop.round(steps)  # warm-up: the window normzoo's first (untimed) one matches
    bare = [loop.round(steps) for _ in range(rounds)]
    del loop
    if compile_mode:
        torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as out:
        ours = normzoo_windows(backbone, norm, dataset, steps, rounds, batch_size, device, channels_last, amp,
                               compile_mode, out)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{label:<48} bare {b:9.0f} img/s   normzoo {o:9.0f} img/s   ratio {o / b:5.3f}", flush=True)
    return {"label": label, "norm": norm, "compile": compile_mode, "bare_img_s": b, "normzoo_img_s": o,
            "ratio": o / b, "bare_rounds": bare, "normzoo_rounds": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    if args.device == "cpu":
        compare("vgg11,width=0.5 bn fashion-mnist-mini b128 fp32", "vgg11,width=0.5", "bn", "fashion-mnist-mini",
                args.steps or 10, 128, "cpu", args.rounds)
        compare("vgg11,width=0.5 lp:inf fashion-mnist-mini b128 fp32", "vgg11,width=0.5", "lp:inf",
                "fashion-mnist-mini", args.steps or 10, 128, "cpu", args.rounds)
        return
    cifar = "synthetic,n=20000,n_test=256,size=32,channels=3,classes=10"
    steps = args.steps or 100
    compare("vgg11 bn CIFAR-shape b128 fp32", "vgg11", "bn", cifar, steps, 128, args.device, args.rounds)
    compare("vgg11 bn CIFAR-shape b128 bf16+channels_last", "vgg11", "bn", cifar, steps, 128, args.device,
            args.rounds, channels_last=True, amp=True)
    compare("vgg11 lp:inf CIFAR-shape b128 bf16+channels_last", "vgg11", "lp:inf", cifar, steps, 128,
            args.device, args.rounds, channels_last=True, amp=True)
    for mode in ("default", "reduce-overhead"):
        for norm in ("bn", "lp:inf"):
            compare(f"vgg11 {norm} CIFAR-shape b128 bf16+cl+compile({mode})", "vgg11", norm, cifar, steps, 128,
                    args.device, args.rounds, channels_last=True, amp=True, compile_mode=mode)


if __name__ == "__main__":
    main()
