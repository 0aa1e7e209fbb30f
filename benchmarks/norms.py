"""Forward+backward time of every registered norm as a ratio to ``torch.nn.BatchNorm2d``.

    python benchmarks/norms.py                      # CPU, all registered norms (plugins included) + lp:1, lp:inf
    python benchmarks/norms.py --device cuda --repeats 50
    python benchmarks/norms.py --spec lp:inf --spec topk-bn:5 --no-registry

Each norm is timed in train mode on a float32 input of each shape: forward, then backward of a fixed random
upstream gradient (the input requires grad). BatchNorm2d and the norm are measured alternately in the same process
(BN, norm, BN, norm, ...) after a warm-up, and the ratio is median(norm) / median(BN), so drifts of the machine
hit both. Goal for the built-in batch norms: ratio <= 1.5 (noisy-bn excepted: its per-element random draws
alone cost more than a BN layer on CPU; the ``noisy-bn:bn=false`` row shows that floor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

from normzoo.norms.base import create_norm  # noqa: E402
from normzoo.plugins import registry  # noqa: E402

SHAPES = ((128, 64, 32, 32), (128, 256, 8, 8))
# noisy-bn:bn=false is Algorithm 1's noise alone (two random draws per element, no BN): the floor under noisy-bn.
EXTRA_SPECS = ("lp:1", "lp:inf", "noisy-bn:bn=false")


def fwd_bwd_timer(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, sync):
    """A closure timing one train-mode forward+backward of ``module`` in seconds."""
    x = x.detach().clone().requires_grad_()

    def run() -> float:
        x.grad = None
        module.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        module(x).backward(grad)
        sync()
        return time.perf_counter() - start

    return run


def measure(spec: str, shape: tuple[int, ...], device: torch.device, repeats: int, warmup: int) -> dict:
    x = torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bn = nn.BatchNorm2d(shape[1], device=device).train()
    norm = create_norm(spec, shape[1], device=device).train()
    time_bn, time_norm = fwd_bwd_timer(bn, x, grad, sync), fwd_bwd_timer(norm, x, grad, sync)
    for _ in range(warmup):
        time_bn(), time_norm()
    bn_times, norm_times = [], []
    for _ in range(repeats):
        bn_times.append(time_bn())
        norm_times.append(time_norm())
    bn_ms, norm_ms = 1e3 * statistics.median(bn_times), 1e3 * statistics.median(norm_times)
    return {"spec": spec, "shape": list(shape), "bn_ms": bn_ms, "norm_ms": norm_ms, "ratio": norm_ms / bn_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per norm and shape "
                        "(default: 15 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--spec", action="append", default=[], help="an extra norm spec to time (repeatable)")
    parser.add_argument("--no-registry", action="store_true", help="time only the --spec norms")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (15 if device.type == "cpu" else 50)
    specs = [] if args.no_registry else [entry.name for entry in registry("norms")] + list(EXTRA_SPECS)
    specs += [s for s in args.spec if s not in specs]

    if not args.json:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"cpu, {torch.get_num_threads()} threads"
        print(f"torch {torch.__version__} on {where}; float32, train mode, forward+backward; "
              f"median of {repeats} interleaved repeats; ratio = norm / nn.BatchNorm2d")
        header = f"{'norm':<20}" + "".join(f"{'x'.join(map(str, s)):>22}" for s in SHAPES)
        print(header)
        print(f"{'':<20}" + "".join(f"{'ms':>12}{'ratio':>10}" for _ in SHAPES))
    bn_line: list[str] = []
    for spec in specs:
        cells = []
        for shape in SHAPES:
            result = measure(spec, shape, device, repeats, args.warmup)
            if args.json:
                print(json.dumps(result), flush=True)
            cells.append(f"{result['norm_ms']:>12.2f}{result['ratio']:>9.2f}x")
            if len(bn_line) < len(SHAPES):
                bn_line.append(f"{result['bn_ms']:>12.2f}{1.0:>9.2f}x")
        if not args.json:
            if spec == specs[0]:
                print(f"{'BatchNorm2d':<20}" + "".join(bn_line))
            print(f"{spec:<20}" + "".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
