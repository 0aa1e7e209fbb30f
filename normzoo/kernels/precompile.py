"""Compile the kernels without running them: ahead of a benchmark, in parallel, or for a GPU that is not there.

Triton compiles a kernel the first time it is launched with a new specialization (dtype, flags, which integer
arguments are multiples of 16, ...), about a second each, one after the other. Under :func:`compile_only` every
launch compiles for the given GPU target and returns without running, the result landing in Triton's on-disk cache
where a later real launch with the same specialization finds it. :func:`precompile` runs the launch sequences of a
list of :class:`Plan` in worker processes that way (``benchmarks/gpu.py`` does, before it times anything).

``python -m normzoo.kernels.precompile [--capability 90]`` compiles every configuration the norms use — each scale,
noise placement, dtype, layout, affine or not, synced or not — down to a cubin for that target, no GPU needed.
``--cover`` compiles the fewer plans of :func:`covering_plans` instead (every kernel with every pair of its flags'
values and every input dtype and layout); ``tests/test_kernels.py`` runs that for sm_90. The interpreter tests check
what the kernels compute; this checks that Triton's compiler accepts them (the interpreter accepts code the compiler
would reject).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALL_SCALES = (("power", 2.0, False, 1.0, 1), ("power", 2.0, True, 1.0, 1), ("power", 1.0, False, 1.0, 1),
              ("power", 1.0, True, math.sqrt(math.pi / 2), 1), ("power", 3.0, False, 1.0, 1),
              ("power", 3.0, True, 1.0, 1), ("power", math.inf, False, 1.0, 1), ("power", math.inf, True, 1.0, 1),
              ("topk", math.inf, True, 1.0, 10), ("topk", math.inf, True, 1.0, 1))


@dataclass(frozen=True)
class Plan:
    """One forward and backward of one norm configuration on one input shape.

    ``scale`` is the ``normzoo::batch_scale_norm`` arguments (kind, p, centered, factor, k), or None for noisy-bn,
    whose ``noise`` is "after", "before" (batch norm fused with the noise) or "alone" (``bn=false``).
    """

    shape: tuple[int, ...]
    dtype: str = "float32"
    channels_last: bool = False
    scale: tuple | None = None
    noise: str | None = None
    affine: bool = True
    synced: bool = False


def plans_for(norm_spec: str, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
              channels_last: bool) -> list[Plan]:
    """The plans of a norm spec (``"lp:inf"``, ``"noisy-bn:where=before"``, ...) on these shapes; none for norms
    without kernels."""
    from normzoo.norms import NoisyBatchNorm
    from normzoo.norms._scale import BatchScaleNorm
    from normzoo.norms.base import create_norm

    norm = create_norm(norm_spec, 2)
    name = str(dtype).removeprefix("torch.")
    if isinstance(norm, BatchScaleNorm):
        return [Plan(tuple(s), name, channels_last, scale=norm.scale_spec.op_args(), affine=norm.affine)
                for s in shapes]
    if isinstance(norm, NoisyBatchNorm):
        noise = norm.where if norm.bn else "alone"
        return [Plan(tuple(s), name, channels_last, noise=noise, affine=norm.affine) for s in shapes]
    return []


def run(plan: Plan) -> None:
    """The plan's launches (forward, then backward) on zero tensors of its shape."""
    from normzoo.kernels import noise, scale_norm

    x = torch.zeros(plan.shape, dtype=DTYPES[plan.dtype])
    if plan.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    C = plan.shape[1]
    weight, bias = (torch.ones(C), torch.zeros(C)) if plan.affine else (None, None)
    seed = torch.zeros(1, dtype=torch.int64)
    gather = (lambda rows: torch.cat([rows, rows])) if plan.synced else None  # two replicas' shapes
    if plan.noise == "alone":
        for backward in (False, True):
            noise.channel_noise(x, seed, 0, 0.5, 1.25, 0.1, 0.1, backward=backward)
        return
    if plan.noise is not None:
        scale = scale_norm.Scale.of("bn", 2.0, True, 1.0, 1)
        nz = scale_norm.Noise(seed, 0, 0.5, 1.25, 0.1, 0.1, plan.noise == "before")
    else:
        scale, nz = scale_norm.Scale.of(*plan.scale), None
    out, mean, s, aux = scale_norm.forward(x, weight, bias, scale, 1e-5, gather=gather, noise=nz)
    scale_norm.backward(x, x, weight, mean, s, aux, scale, 1e-5, gather=gather, noise=nz)


class CompileOnlyDriver:
    """Enough of a Triton driver to compile: a fixed CUDA target, device 0, stream 0."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(capability: int) -> Iterator[set[str]]:
    """Inside: every kernel launch compiles for sm_<capability> and returns without running (CPU tensors work).

    Yields the set of compiled specializations (kernel name and hash), filled as launches happen.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only() compiles for a GPU: unset TRITON_INTERPRET")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled: set[str] = set()
    launch = JITFunction.run

    def run_compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.add(f"{self.fn.__name__}[{kernel.hash[:12]}]")
        return kernel

    previous = driver._active  # None until the real driver is first needed (on a machine without a GPU: never)
    driver.set_active(CompileOnlyDriver(capability))
    JITFunction.run = run_compile_only
    try:
        yield compiled
    finally:
        JITFunction.run = launch
        driver._active = previous


def _compile_plans(plans: list[Plan], capability: int) -> list[str]:
    torch.set_num_threads(1)
    with compile_only(capability) as compiled:
        for plan in plans:
            run(plan)
    return sorted(compiled)


def precompile(plans: Sequence[Plan], capability: int, processes: int | None = None) -> set[str]:
    """Compile the plans' kernels for sm_<capability> in worker processes; the specializations (name and hash).

    Duplicated specializations across workers are compiled more than once (and cached once): plans are dealt out
    round-robin, which spreads the shapes of one norm over the workers.
    """
    plans = list(dict.fromkeys(plans))
    processes = max(1, min(processes or (os.cpu_count() or 1), len(plans)))
    chunks = [plans[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        results = pool.map(_compile_plans, chunks, [capability] * len(chunks))
        return set().union(*map(set, results))


def every_plan() -> list[Plan]:
    """Every configuration the norms use, each on a small NCHW float32, channels_last bfloat16, float16 and 2-D
    input: what the compile check covers."""
    plans = []
    for shape, dtype, channels_last in (((8, 32, 6, 5), "float32", False), ((8, 32, 6, 5), "bfloat16", True),
                                        ((8, 32, 6, 5), "float16", False), ((8, 32), "float32", False)):
        for affine in (True, False):
            common = {"shape": shape, "dtype": dtype, "channels_last": channels_last, "affine": affine}
            plans += [Plan(scale=scale, **common) for scale in ALL_SCALES]
            plans += [Plan(noise=noise, **common) for noise in ("after", "before", "alone")]
    plans += [Plan((8, 32, 6, 5), scale=scale, synced=True) for scale in ALL_SCALES if scale[0] != "topk"]
    plans += [Plan((8, 32, 6, 5), noise="after", synced=True)]
    return plans


def exercised(plan: Plan) -> set[tuple]:
    """What the plan's launches exercise, found without compiling: for each kernel, every pair of its flags' values
    (its compile-time constants other than tile sizes, each alone for a kernel with one) and the input's dtype and
    layout."""
    from triton.runtime.jit import JITFunction

    found: set[tuple] = set()
    launch = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        values = dict(zip((param.name for param in self.params), args)) | kwargs
        flags = sorted((param.name, values[param.name]) for param in self.params
                       if param.is_constexpr and not param.name.startswith("BLOCK_"))
        name = self.fn.__name__
        found.add((name, "input", plan.dtype, plan.channels_last, len(plan.shape)))
        found.update((name, "flags", *pair) for pair in itertools.combinations(flags, min(2, len(flags))))

    JITFunction.run = record
    try:
        run(plan)
    finally:
        JITFunction.run = launch
    return found


def covering_plans(plans: Sequence[Plan]) -> list[Plan]:
    """Few of ``plans`` that together exercise everything they do (:func:`exercised`), chosen greedily.

    Every kernel still compiles with every value of each flag, every pair of values of two flags, and every input
    dtype and layout, in about 40 % of the specializations: what a GPU-less check can afford to compile (half a
    second of CPU each) while still reaching every branch the flags select and every load and store's type.
    """
    covers = {plan: exercised(plan) for plan in dict.fromkeys(plans)}
    missing = set().union(*covers.values())
    chosen = []
    while missing:
        plan = max(covers, key=lambda p: len(covers[p] & missing))
        chosen.append(plan)
        missing -= covers.pop(plan)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability ×10 (default 90)")
    parser.add_argument("--processes", type=int, default=1, help="compile in this many worker processes")
    parser.add_argument("--cover", action="store_true",
                        help="compile only plans that cover every kernel's flag values (pairwise), dtypes and layouts")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    every = every_plan()
    plans = covering_plans(every) if args.cover else every
    if args.processes > 1:
        compiled = precompile(plans, args.capability, args.processes)
    else:
        compiled = set(_compile_plans(plans, args.capability))
    print(f"{len(compiled)} kernel specializations compiled for sm_{args.capability} from {len(plans)} plans"
          f"{f' (covering all {len(every)})' if args.cover else ''} in {time.perf_counter() - start:.0f} s")
    print("kernels:", " ".join(sorted({name.split("[")[0] for name in compiled})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
