"""Each probe's cost in units of one training step, and what the paper's probe set adds to a run's wall time.

    python benchmarks/probes.py                          # CPU: vgg11 (width 0.5) at batch 128
    python benchmarks/probes.py --device cuda --width 1  # the full vgg11 on a GPU

Part 1 times one training step (forward, backward, SGD update) and each probe's ``measure`` on the same model
and batch, alternately, and prints median(probe) / median(step). Goals: ``landscape`` with k step sizes costs at
most k + 1 steps; ``ics`` at most one step per tracked layer. Part 2 trains with the paper's probe set
(``ics``, ``landscape``, ``activations``) at ``every=100`` and prints the probe time as a fraction of the
training time, both measured by the runner itself (goal: at most 15 %).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from normzoo import build_model
from normzoo.config import RunConfig
from normzoo.data import load_dataset
from normzoo.plugins import registry
from normzoo.probe import ProbeContext
from normzoo.runner import Trainer

PAPER_SET = ("ics:every=100", "landscape:every=100", "activations:every=100")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def probe_costs(backbone: str, norm: str, batch_size: int, device: torch.device, repeats: int,
                names: tuple[str, ...] | None = None) -> dict:
    """Each registered probe's (or each of ``names``') ``measure`` (default parameters) in units of one training
    step; printed, returned."""
    data = load_dataset("fashion-mnist-mini")
    torch.manual_seed(0)
    model = build_model(backbone, norm, num_classes=data.num_classes, in_chans=data.input_shape[0]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = data.train_x[:batch_size].to(device), data.train_y[:batch_size].to(device)

    def train_step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    context = ProbeContext(model, F.cross_entropy, x, y, optimizer, 0.05, 1, 1000)
    probes = [(entry.name, registry("probes").build(entry.name)) for entry in registry("probes")
              if names is None or entry.name in names]
    for _ in range(2):  # warm-up, and a populated momentum buffer for ics
        train_step()
        for _, probe in probes:
            probe.measure(context)
    step_times: list[float] = []
    probe_times: dict[str, list[float]] = {name: [] for name, _ in probes}
    for _ in range(repeats):
        for name, probe in probes:
            step_times.append(timed(train_step, device))
            probe_times[name].append(timed(lambda: probe.measure(context), device))
    step = statistics.median(step_times)
    print(f"one training step: {1e3 * step:.1f} ms ({backbone}, {norm}, batch {batch_size}, {device})")
    print(f"{'probe (defaults)':<18}{'ms':>10}{'steps':>9}   goal")
    costs = {}
    for name, probe in probes:
        cost = statistics.median(probe_times[name]) / step
        costs[name] = {"ms": 1e3 * cost * step, "steps": cost, "goal": goal(name, probe, model)}
        print(f"{name:<18}{1e3 * cost * step:>10.1f}{cost:>9.2f}   {costs[name]['goal']}")
    return {"step_ms": 1e3 * step, "probes": costs}


def goal(name: str, probe, model) -> str:
    if name == "landscape":
        k = len(probe.step_sizes(1.0)) if hasattr(probe, "step_sizes") else getattr(probe, "steps", 0)
        return f"<= {k + 1} (k = {k} step sizes)"
    if name == "ics":
        from normzoo_probes.common import tracked_layers

        return f"<= {len(tracked_layers(model, probe.layers))} (one per tracked layer)"
    return ""


def probe_set_overhead(backbone: str, norm: str, batch_size: int, device: str, steps: int) -> dict:
    """The paper's probe set at every=100 through the runner: probe time / training time; printed, returned."""
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(backbone=backbone, norm=norm, dataset="fashion-mnist-mini", steps=steps,
                           batch_size=batch_size, lr=0.05, device=device, probes=list(PAPER_SET),
                           log_every=50, eval_every=10**9, out=out, schedule="constant")
        summary = Trainer(config, quiet=True).fit().summary
    share = summary["probe_time_s"] / summary["train_time_s"]
    print(f"paper probe set ({', '.join(PAPER_SET)}) over {steps} steps: probes {summary['probe_time_s']:.1f} s, "
          f"training {summary['train_time_s']:.1f} s -> +{100 * share:.1f} % wall time (goal <= 15 %)")
    return {"steps": steps, "probe_time_s": summary["probe_time_s"], "train_time_s": summary["train_time_s"],
            "added": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", default=None, help="vgg11 width multiplier (default: 0.5 on CPU, 1 on CUDA)")
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of part 2 (default: 200 on CPU, 1000 on CUDA, where the first "
                             "measurement's one-time costs would otherwise dominate)")
    args = parser.parse_args()
    device = torch.device(args.device)
    width = args.width or ("0.5" if device.type == "cpu" else "1")
    backbone = f"vgg11,width={width}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    probe_costs(backbone, args.norm, args.batch_size, device, args.repeats)
    steps = args.steps or (200 if device.type == "cpu" else 1000)
    probe_set_overhead(backbone, args.norm, args.batch_size, args.device, steps)


if __name__ == "__main__":
    main()
