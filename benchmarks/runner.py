"""normzoo's training step vs a bare hand-written PyTorch loop: images/s, interleaved in one process.

    python benchmarks/runner.py                      # CPU: vgg11 (width 0.5) on fashion-mnist-mini, batch 128
    python benchmarks/runner.py --device cuda        # adds vgg11/CIFAR-shape bf16 + channels_last (+compile)

Both loops train the same architecture on the same device-resident data with the same batches; rounds
alternate between them so drift in machine speed hits both. Goal: ratio ≥ 0.95.
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
from normzoo.runner import Trainer, batch_indices


def bare_loop(backbone: str, norm: str, data, steps: int, batch_size: int, device: torch.device,
              channels_last: bool, amp: bool, compile_mode: str | None) -> float:
    """The loop a researcher would write by hand; returns images/s."""
    torch.manual_seed(0)
    model = build_model(backbone, norm, num_classes=data.num_classes, in_chans=data.input_shape[0]).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x_all = data.train_x.to(device).contiguous(memory_format=fmt)
    y_all = data.train_y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    batches = [batch_indices(0, s, len(y_all), batch_size).to(device) for s in range(steps + 2)]

    def step(i: int) -> None:
        x, y = x_all[batches[i]], y_all[batches[i]]
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up (and compilation): the trainer's first, untimed-here window pays for it too
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(2, steps + 2):
        step(i)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def normzoo_loop(backbone: str, norm: str, dataset: str, steps: int, batch_size: int, device: str,
                 channels_last: bool, amp: bool, compile_mode: str | None, out: str) -> float:
    """normzoo's Trainer over the same setting; images/s from the timed training windows (no setup/eval)."""
    config = RunConfig(backbone=backbone, norm=norm, dataset=dataset, steps=steps, batch_size=batch_size,
                       lr=0.05, device=device, channels_last=channels_last, amp="bf16" if amp else "off",
                       compile=compile_mode, log_every=steps // 2, eval_every=10**9, out=out,
                       schedule="constant")
    result = Trainer(config, quiet=True).fit()
    # The second window excludes the warm-up the first window paid for (compilation included).
    windows = [r for r in RunDir(result.run_dir).read_log() if r["type"] == "train"]
    return windows[-1]["images_per_s"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(label: str, backbone: str, norm: str, dataset: str, steps: int, batch_size: int, device: str,
            rounds: int, channels_last: bool = False, amp: bool = False, compile_mode: str | None = None) -> None:
    data = load_dataset(dataset)
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            if compile_mode:  # each loop compiles afresh, never hitting a recompile limit and falling back to eager
                torch._dynamo.reset()
            bare.append(bare_loop(backbone, norm, data, steps, batch_size, torch.device(device), channels_last, amp,
                                   compile_mode))
            if compile_mode:
                torch._dynamo.reset()
            ours.append(normzoo_loop(backbone, norm, dataset, 2 * steps, batch_size, device, channels_last, amp,
                                     compile_mode, out))
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{label:<48} bare {b:9.0f} img/s   normzoo {o:9.0f} img/s   ratio {o / b:5.3f}", flush=True)


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
    for mode in ("default", "reduce-overhead"):  # one round: each compiles for tens of seconds
        for norm in ("bn", "lp:inf"):
            compare(f"vgg11 {norm} CIFAR-shape b128 bf16+cl+compile({mode})", "vgg11", norm, cifar, steps, 128,
                    args.device, 1, channels_last=True, amp=True, compile_mode=mode)


if __name__ == "__main__":
    main()
