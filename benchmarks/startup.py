"""How long normzoo takes to start, as ratios to ``python -c "import torch"`` measured side by side.

    python benchmarks/startup.py [--repeats 5]

Rounds alternate between the commands, so a busy machine slows all of them alike; each figure is the median over
the rounds. Goals (issue "a start in seconds"):

- ``normzoo --help`` and the listings (``plugins``, ``norms``, ``probes``, ``backbones``, ``datasets``, with and
  without ``--json``) import no torch: at most 1.5 s each, whole process;
- ``normzoo run`` start-up, from the interpreter's first line to the first training step of a tiny run
  (VGG-11 at width 1/16 on synthetic data), at most 1.3 × the time ``import torch`` takes, timed the same way;
  also printed: ``import torch`` plus making a ``torch.optim.SGD``, which imports ``torch._dynamo``, the cost
  ``normzoo.optim`` spares a run.

Both are measured with the registry cache warm, as every process after the first finds it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

LISTINGS = [["--help"], ["plugins"], ["plugins", "--json"], ["norms"], ["norms", "--json"], ["probes"],
            ["probes", "--json"], ["backbones"], ["backbones", "--json"], ["datasets"], ["datasets", "--json"]]

TORCH = """
import time
start = time.perf_counter()
import torch
print(f"SECONDS {time.perf_counter() - start:.4f}")
"""

# torch.optim's Optimizer imports torch._dynamo the first time one of its methods runs (seconds, more than normzoo's
# own start-up); normzoo's optimizers do not, and this shows what they spare.
TORCH_OPTIM = """
import time
start = time.perf_counter()
import torch
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
print(f"SECONDS {time.perf_counter() - start:.4f}")
"""

# The first probe call happens before step 0's update: everything before it is start-up.
RUN = """
import sys, time
start = time.perf_counter()
from normzoo import hookimpl
from normzoo.plugins import get_plugins
from normzoo.probe import Probe


class FirstStep(Probe):
    name = "first-step"

    def measure(self, ctx):
        print(f"SECONDS {time.perf_counter() - start:.4f}", flush=True)
        return {}


class Plugin:
    @hookimpl
    def register_probes(self, register):
        register("first-step", FirstStep, summary="prints the time to the first step")


get_plugins().register(Plugin(), name="startup-benchmark")
from normzoo.cli import main
main(["run", "--backbone", "vgg11,width=0.0625", "--norm", "bn", "--dataset", "synthetic,n=64,n_test=16",
      "--batch-size", "16", "--steps", "1", "--device", "cpu", "--probe", "first-step:at=0",
      "--out", sys.argv[1], "--quiet"])
"""


def seconds_inside(code: str, *args: str) -> float:
    """The time a child reports from its first line (interpreter start-up excluded, the same for every child)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("SECONDS")))


def seconds_whole(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "normzoo", *args], capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seconds_whole(["plugins"])  # fill the registry cache, as the first command after an install does
    torch_inside, optim_inside, run_inside, torch_whole = [], [], [], []
    listings: dict[str, list[float]] = {" ".join(args): [] for args in LISTINGS}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(options.repeats):
            torch_inside.append(seconds_inside(TORCH))
            optim_inside.append(seconds_inside(TORCH_OPTIM))
            run_inside.append(seconds_inside(RUN, out))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            torch_whole.append(time.perf_counter() - start)
            for args in LISTINGS:
                listings[" ".join(args)].append(seconds_whole(args))
    torch_s, run_s = statistics.median(torch_inside), statistics.median(run_inside)
    print(f"import torch: {torch_s:.2f} s from the first line, {statistics.median(torch_whole):.2f} s as a process "
          f"(median of {options.repeats})\n")
    print(f"{'command':<28} {'seconds':>8} {'× import torch':>15}  goal")
    for name, times in listings.items():
        median = statistics.median(times)
        mark = "" if median <= 1.5 else "  !"
        print(f"normzoo {name:<20} {median:8.2f} {median / statistics.median(torch_whole):15.2f}  ≤ 1.5 s{mark}")
    ratio, optim_s = run_s / torch_s, statistics.median(optim_inside)
    print(f"{'normzoo run, to step 0':<28} {run_s:8.2f} {ratio:15.2f}  ≤ 1.3 ×{'  !' if ratio > 1.3 else ''}")
    print(f"\nimport torch and make a torch.optim.SGD (torch._dynamo comes with it): {optim_s:.2f} s "
          f"({optim_s / torch_s:.2f} × import torch), which normzoo.optim spares a run")


if __name__ == "__main__":
    main()
