"""Forward+backward time of every registered norm as a ratio to ``torch.nn.BatchNorm2d``, and the peak memory
of a vgg11 training step with each built-in batch norm as a ratio to the same step with ``bn``.

    python benchmarks/norms.py                      # CPU, all registered norms (plugins included) + lp:1, lp:inf
    python benchmarks/norms.py --device cuda --repeats 50
    python benchmarks/norms.py --spec lp:inf --spec topk-bn:5 --no-registry
    python benchmarks/norms.py --memory             # adds the vgg11 peak-memory table (--memory-only: just that)

Time. Each norm is timed in train mode on a float32 input of each shape: forward, then backward of a fixed random
upstream gradient (the input requires grad). BatchNorm2d and the norm are measured alternately in the same process
(BN, norm, BN, norm, ...) after a warm-up, and the ratio is median(norm) / median(BN), so drifts of the machine
hit both. Goal for every built-in norm: ratio <= 1.2 on CPU and on CUDA. Exception: noisy-bn on CPU. Algorithm 1
draws two random numbers per activation, and torch's CPU generator alone (``uniform_`` on the 8.4M floats of the
first shape takes about as long as BN's whole forward+backward; torch.compile's CPU Philox is slower still) puts
the noise without any BN, the ``noisy-bn:bn=false`` row, at 3.5x or more: that row is noisy-bn's floor on CPU.

Memory (``--memory``). One training step of the CIFAR vgg11 backbone (``build_model("vgg11", norm,
num_classes=10, in_chans=3)``, float32, batch 128 of 3x32x32): zero_grad(set_to_none), forward,
cross-entropy, backward, SGD-with-momentum step, measured on the second step (the momentum buffers exist).
"Peak" is the most bytes of tensors alive at once during the step, the parameters, buffers, momentum buffers
and the batch included. On CUDA it is ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``).
On CPU there is no allocator peak counter: the step runs under ``torch.profiler`` with ``profile_memory=True``,
and the peak is the bytes live before the step (parameters, buffers, optimizer state and batch, deduplicated by
storage) plus the maximum of the running sum of every allocation and free the CPU allocator reports during the
step (memory that oneDNN manages itself, outside PyTorch's allocator, is not seen). The table also shows the
part above that baseline (activations saved for backward, gradients and temporaries). Goal: peak <= 1.1x bn's
for lp:inf, and the same bound is applied to every built-in batch norm in the table.

Rows of built-in norms over a goal are marked with ``!`` (``~`` for noisy-bn on CPU, excepted).
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from normzoo.norms.base import create_norm, parse_norm  # noqa: E402
from normzoo.plugins import registry  # noqa: E402

SHAPES = ((128, 64, 32, 32), (128, 256, 8, 8))
# noisy-bn:bn=false is Algorithm 1's noise alone (two random draws per element, no BN): the floor under noisy-bn.
EXTRA_SPECS = ("lp:1", "lp:inf", "noisy-bn:bn=false")
TIME_GOAL = 1.2  # norm / nn.BatchNorm2d, forward+backward, every built-in norm
MEMORY_GOAL = 1.1  # peak of a vgg11 training step with the norm / with bn
MEMORY_SPECS = ("bn", "noisy-bn", "lp", "lp:1", "lp:inf", "l1-bn", "topk-bn")  # the built-in batch norms
MEMORY_BACKBONE, MEMORY_BATCH = "vgg11", 128
BUILTIN_PLUGIN = "normzoo.norms"


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


def fwd_bwd_peak(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak bytes allocated during one forward+backward of ``module`` above what was live before it."""
    x = x.detach().clone().requires_grad_()

    def step() -> None:
        module(x).backward(grad)

    if x.device.type != "cuda":
        return _cpu_step_peak(step)
    torch.cuda.synchronize(x.device)
    base = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    step()
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - base


def measure(spec: str, shape: tuple[int, ...], device: torch.device, repeats: int, warmup: int, *,
            dtype: torch.dtype = torch.float32, channels_last: bool = False, compile_backend: str | None = None,
            memory: bool = False) -> dict:
    """Forward+backward time of the norm ``spec`` and of ``nn.BatchNorm2d``, measured alternately, and their ratio.

    ``dtype``/``channels_last`` set the input (the modules keep float32 parameters, as under autocast);
    ``compile_backend`` times ``torch.compile(nn.Sequential(norm, nn.ReLU()))`` against the same with BN instead
    (the norm inside a compiled model, fused with what follows it where the compiler can); ``memory`` adds the peak
    bytes of one forward+backward above the input's (``fwd_bwd_peak``) and its ratio to BN's.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bn = nn.BatchNorm2d(shape[1], device=device).train()
    norm = create_norm(spec, shape[1], device=device).train()
    if compile_backend:
        bn, norm = (torch.compile(nn.Sequential(m, nn.ReLU()), backend=compile_backend) for m in (bn, norm))
    time_bn, time_norm = fwd_bwd_timer(bn, x, grad, sync), fwd_bwd_timer(norm, x, grad, sync)
    for _ in range(warmup):
        time_bn(), time_norm()
    bn_times, norm_times = [], []
    for _ in range(repeats):
        bn_times.append(time_bn())
        norm_times.append(time_norm())
    bn_ms, norm_ms = 1e3 * statistics.median(bn_times), 1e3 * statistics.median(norm_times)
    result = {"spec": spec, "shape": list(shape), "bn_ms": bn_ms, "norm_ms": norm_ms, "ratio": norm_ms / bn_ms}
    if memory:
        bn_peak, norm_peak = fwd_bwd_peak(bn, x, grad), fwd_bwd_peak(norm, x, grad)
        result |= {"bn_peak_mib": bn_peak / 2**20, "norm_peak_mib": norm_peak / 2**20,
                   "peak_ratio": norm_peak / max(bn_peak, 1)}
    return result


# -- peak memory of a training step ---------------------------------------------------------------------------------
def _live_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _cpu_step_peak(step) -> int:
    """Peak of the running sum of the CPU allocator's allocations and frees during ``step()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def training_step_memory(spec: str, device: torch.device, batch: int = MEMORY_BATCH,
                         backbone: str = MEMORY_BACKBONE) -> dict:
    """Peak tensor bytes of one vgg11 training step with the norm ``spec`` (see the module docstring)."""
    from normzoo.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, spec, num_classes=10, in_chans=3, device=device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    target = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    step()  # creates the momentum buffers
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        state = [v for s in optimizer.state.values() for v in s.values()]
        base = _live_bytes([*model.parameters(), *model.buffers(), *state, x, target])
        peak = base + _cpu_step_peak(step)
    return {"spec": spec, "backbone": backbone, "batch": batch, "peak_mib": peak / 2**20, "base_mib": base / 2**20}


# -- the report -------------------------------------------------------------------------------------------------------
def builtin_specs(specs: list[str]) -> set[str]:
    builtins = {entry.name for entry in registry("norms") if entry.plugin == BUILTIN_PLUGIN}
    return {s for s in specs if parse_norm(s).family in builtins}


def mark(spec: str, ratio: float, goal: float, builtins: set[str], device: torch.device) -> str:
    """`` !`` for a built-in norm over the goal, `` ~`` for noisy-bn over it on CPU (excepted), else blanks."""
    if spec not in builtins or ratio <= goal:
        return "  "
    return " ~" if device.type == "cpu" and parse_norm(spec).family == "noisy-bn" else " !"


def time_table(specs: list[str], device: torch.device, repeats: int, warmup: int, as_json: bool,
               builtins: set[str]) -> None:
    if not as_json:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"cpu, {torch.get_num_threads()} threads"
        print(f"torch {torch.__version__} on {where}; float32, train mode, forward+backward; "
              f"median of {repeats} interleaved repeats; ratio = norm / nn.BatchNorm2d")
        print(f"goal: ratio <= {TIME_GOAL} for every built-in norm ('!' marks a miss"
              + ("; noisy-bn excepted on CPU, '~', its floor is the noisy-bn:bn=false row)" if device.type == "cpu"
                 else ")"))
        print(f"{'norm':<20}" + "".join(f"{'x'.join(map(str, s)):>22}" for s in SHAPES))
        print(f"{'':<20}" + "".join(f"{'ms':>12}{'ratio':>10}" for _ in SHAPES))
    bn_line: list[str] = []
    for spec in specs:
        cells = []
        for shape in SHAPES:
            result = measure(spec, shape, device, repeats, warmup)
            if as_json:
                print(json.dumps(result), flush=True)
            cells.append(f"{result['norm_ms']:>12.2f}{result['ratio']:>8.2f}x"
                         + mark(spec, result["ratio"], TIME_GOAL, builtins, device))
            if len(bn_line) < len(SHAPES):
                bn_line.append(f"{result['bn_ms']:>12.2f}{1.0:>8.2f}x  ")
        if not as_json:
            if spec == specs[0]:
                print(f"{'BatchNorm2d':<20}" + "".join(bn_line))
            print(f"{spec:<20}" + "".join(cells), flush=True)


def memory_table(specs: list[str], device: torch.device, as_json: bool, builtins: set[str]) -> None:
    specs = ["bn"] + [s for s in specs if s != "bn"]
    if not as_json:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
            "live tensor bytes, CPU allocator events via torch.profiler"
        print(f"\npeak memory of one {MEMORY_BACKBONE} training step (batch {MEMORY_BATCH}x3x32x32, float32, SGD "
              f"momentum) on {where}; {how}; ratio = norm / bn")
        print(f"goal: peak ratio <= {MEMORY_GOAL} for every built-in batch norm ('!' marks a miss)")
        print(f"{'norm':<20}{'peak MiB':>10}{'ratio':>9}  {'above base MiB':>16}{'ratio':>9}")
    bn_result = None
    for spec in specs:
        result = training_step_memory(spec, device)
        bn_result = bn_result or result
        result["ratio"] = result["peak_mib"] / bn_result["peak_mib"]
        above, bn_above = result["peak_mib"] - result["base_mib"], bn_result["peak_mib"] - bn_result["base_mib"]
        result["above_base_ratio"] = above / bn_above
        if as_json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{spec:<20}{result['peak_mib']:>10.1f}{result['ratio']:>8.3f}x"
                  + mark(spec, result["ratio"], MEMORY_GOAL, builtins, torch.device("cuda"))
                  + f"{above:>16.1f}{result['above_base_ratio']:>8.3f}x", flush=True)


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
    parser.add_argument("--memory", action="store_true", help=f"also measure the peak memory of a "
                        f"{MEMORY_BACKBONE} training step with bn, the built-in batch norms and the --spec norms")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table (implies --memory)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (15 if device.type == "cpu" else 50)
    specs = [] if args.no_registry else [entry.name for entry in registry("norms")] + list(EXTRA_SPECS)
    specs += [s for s in args.spec if s not in specs]
    if not args.memory_only:
        time_table(specs, device, repeats, args.warmup, args.json, builtin_specs(specs))
    if args.memory or args.memory_only:
        memory_specs = ([] if args.no_registry else list(MEMORY_SPECS)) + args.spec
        memory_specs = list(dict.fromkeys(memory_specs))
        memory_table(memory_specs, device, args.json, builtin_specs(memory_specs + ["bn"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
