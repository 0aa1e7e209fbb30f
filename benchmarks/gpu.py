"""One command that checks normzoo's GPU story and writes ``gpu-report.md`` and ``gpu-report.json``.

    python benchmarks/gpu.py                   # one CUDA GPU, no network, under 8 minutes
    python benchmarks/gpu.py --smoke           # CPU, toy sizes, seconds: every section end to end (a test runs it)
    python benchmarks/gpu.py --sections norms,runner --budget 300 --out reports/

Sections, each measured side by side in this one process (ratios, never absolute numbers across runs):

* ``norms``: forward+backward time and peak memory of every built-in norm as ratios to ``nn.BatchNorm2d`` at
  128×64×32×32 and 128×256×8×8, float32 NCHW and bfloat16 channels_last, eager and inside a compiled model
  (``torch.compile(norm → ReLU)`` against the same with BN); and the peak memory of a vgg11 training step with each
  built-in batch norm against ``bn`` (``benchmarks/norms.py``). Goals: every built-in batch norm ≤ 1.2× BN's
  time; noisy-bn ≤ 1.05× bn's memory, every other batch norm ≤ 1.1×.
* ``runner``: images/s of normzoo's training loop against a bare loop (``benchmarks/runner.py``), vgg11 on
  CIFAR-shaped batches, bf16 + channels_last, for bn, lp:inf and noisy-bn, eager, ``--compile`` and
  ``--compile reduce-overhead``, medians of several windows. Goals: normzoo ≥ 0.95× bare in every row; every norm
  ≥ 0.9× bn's images/s under reduce-overhead.
* ``probes``: each probe's cost in training steps, and the paper's set at every=100 over 1000 steps
  (``benchmarks/probes.py``).
* ``training``: a real run per norm (none, bn, noisy-bn, lp:1, lp:2, lp:inf, gn) on the data this project has
  offline: the full Fashion-MNIST from Debian's ``dataset-fashion-mnist`` when installed, else the bundled subset;
  test accuracy, time and images/s.

Before timing anything on a GPU, the norms' Triton kernels are compiled in parallel worker processes
(``normzoo.kernels.precompile``), which would otherwise compile one by one at first use. A time budget
(``--budget``, default 420 s from the start) keeps the whole under 8 minutes: each section gets a share of what is
left when it starts, and items that would start past its share are listed as skipped in the report, not run.
Goal misses are marked ``!``. An item that fails is reported with its error and the rest goes on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the other benchmark scripts, and normzoo from this checkout

import torch  # noqa: E402

import norms as norm_bench  # noqa: E402
import probes as probe_bench  # noqa: E402
import runner as runner_bench  # noqa: E402

TIME_GOAL, MEMORY_GOAL, NOISY_MEMORY_GOAL = 1.2, 1.1, 1.05
RUNNER_GOAL, VS_BN_GOAL = 0.95, 0.9
BATCH_NORMS = ("bn", "noisy-bn", "lp", "lp:1", "lp:inf", "lp:3", "lp:1,centered=true", "l1-bn", "topk-bn")
NORMS = BATCH_NORMS + ("gn", "ln", "in", "none")
TRAINING_NORMS = ("none", "bn", "noisy-bn", "lp:1", "lp:2", "lp:inf", "gn")
SECTION_SHARES = {"norms": 0.25, "runner": 0.45, "probes": 0.1, "training": 0.2}


@dataclass
class Settings:
    """Sizes of one report: the GPU's, or the smoke test's toy ones."""

    device: torch.device
    shapes: tuple[tuple[int, ...], ...] = ((128, 64, 32, 32), (128, 256, 8, 8))
    norms: tuple[str, ...] = NORMS
    compiled_norms: tuple[str, ...] = NORMS
    memory_norms: tuple[str, ...] = BATCH_NORMS
    repeats: int = 30
    warmup: int = 5
    compile_backend: str = "inductor"
    batch: int = 128
    runner_backbone: str = "vgg11"
    runner_data: str = "synthetic,n=20000,n_test=256,size=32,channels=3,classes=10"
    runner_norms: tuple[str, ...] = ("bn", "lp:inf", "noisy-bn")
    runner_steps: int = 50
    runner_rounds: int = 3
    runner_modes: tuple[str | None, ...] = (None, "default", "reduce-overhead")
    probe_backbone: str = "vgg11"
    probe_names: tuple[str, ...] | None = None  # None: every registered probe
    probe_repeats: int = 5
    probe_set_steps: int = 1000
    training_backbone: str = "vgg11"
    training_norms: tuple[str, ...] = TRAINING_NORMS
    training_steps: int | None = None  # None: two epochs
    full_data: bool = True  # the Debian package's Fashion-MNIST when installed

    @classmethod
    def smoke(cls) -> Settings:
        tiny = "vgg11,width=0.0625"
        return cls(torch.device("cpu"), shapes=((6, 8, 5, 3),), norms=("bn", "lp:inf", "topk-bn", "noisy-bn", "gn"),
                   compiled_norms=("lp:inf",), memory_norms=("bn", "noisy-bn", "lp:inf"), repeats=2, warmup=1,
                   compile_backend="aot_eager", batch=8, runner_backbone=tiny,
                   runner_data="synthetic,n=64,n_test=16,size=32,channels=3,classes=10", runner_norms=("bn", "lp:inf"),
                   runner_steps=2, runner_rounds=2, runner_modes=(None,), probe_backbone=tiny,
                   probe_names=("activations", "ics"), probe_repeats=1, probe_set_steps=2, training_backbone=tiny,
                   training_norms=("bn", "lp:inf"), training_steps=3, full_data=False)


@dataclass
class Budget:
    """Seconds left for the report, shared out among the sections as each starts."""

    total: float
    start: float = field(default_factory=time.perf_counter)
    section_end: float = 0.0

    def begin(self, section: str, remaining_shares: float) -> None:
        left = self.total - (time.perf_counter() - self.start)
        self.section_end = time.perf_counter() + left * SECTION_SHARES[section] / remaining_shares

    def allows(self) -> bool:
        return time.perf_counter() < self.section_end


class Report:
    """Rows per section, skipped items and errors; written as JSON and Markdown."""

    def __init__(self, settings: Settings, budget: Budget) -> None:
        self.settings, self.budget = settings, budget
        self.sections: dict[str, list[dict]] = {}
        self.notes: dict[str, list[str]] = {}

    def run(self, section: str, label: str, fn: Callable[[], dict | list[dict]]) -> None:
        """Run one item unless its section's share of the budget is spent; record its rows, or its error."""
        rows = self.sections.setdefault(section, [])
        if not self.budget.allows():
            self.note(section, f"skipped (time budget): {label}")
            return
        print(f"[{section}] {label}", flush=True)
        try:
            result = fn()
        except Exception as exc:  # one failing item must not cost the rest of the report
            traceback.print_exc()
            self.note(section, f"error in {label}: {type(exc).__name__}: {exc}")
            return
        rows.extend(result if isinstance(result, list) else [result])

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    def write(self, out: Path, elapsed: float) -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        meta = environment(self.settings, elapsed) | {"budget_s": self.budget.total}
        data = {"meta": meta, "sections": self.sections, "notes": self.notes}
        json_path, md_path = out / "gpu-report.json", out / "gpu-report.md"
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        md_path.write_text(markdown(data))
        return json_path, md_path


def environment(settings: Settings, elapsed: float) -> dict:
    from normzoo import kernels

    device = settings.device
    triton = None
    if kernels.TRITON_INSTALLED:
        import triton as triton_module

        triton = triton_module.__version__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "triton": triton, "kernels": kernels.ENABLED,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "elapsed_s": round(elapsed, 1),
            "smoke": device.type != "cuda"}


# -- sections ------------------------------------------------------------------------------------------------------
def norms_section(report: Report) -> None:
    s = report.settings
    # Most telling first: a section's share of the budget may end before its last items.
    settings = [("fp32", torch.float32, False, None, s.norms), ("bf16+cl", torch.bfloat16, True, None, s.norms),
                ("bf16+cl compiled", torch.bfloat16, True, s.compile_backend, s.compiled_norms)]
    for label, dtype, channels_last, backend, specs in settings[:2]:
        for spec in specs:
            report.run("norms", f"{spec} {label}", lambda spec=spec, setting=(label, dtype, channels_last, backend):
                       _norm_rows(s, spec, *setting))
    for spec in s.memory_norms:
        report.run("norm memory", f"vgg11 step {spec}", lambda spec=spec: norm_bench.training_step_memory(
            spec, s.device, batch=s.batch, backbone=s.training_backbone))
    label, dtype, channels_last, backend, specs = settings[2]
    for spec in specs:
        report.run("norms", f"{spec} {label}", lambda spec=spec: _norm_rows(s, spec, label, dtype, channels_last,
                                                                             backend))


def _norm_rows(s: Settings, spec: str, label: str, dtype: torch.dtype, channels_last: bool,
               backend: str | None) -> list[dict]:
    rows = [norm_bench.measure(spec, shape, s.device, s.repeats, s.warmup, dtype=dtype, channels_last=channels_last,
                               compile_backend=backend, memory=True) | {"setting": label} for shape in s.shapes]
    if backend:
        torch._dynamo.reset()
    return rows


def runner_section(report: Report) -> None:
    s = report.settings
    for mode in s.runner_modes:
        for norm in s.runner_norms:
            label = f"{norm} bf16+cl {mode or 'eager'}"
            report.run("runner", label, lambda norm=norm, mode=mode, label=label: runner_bench.compare(
                label, s.runner_backbone, norm, s.runner_data, s.runner_steps, s.batch, s.device.type,
                s.runner_rounds, channels_last=True, amp=s.device.type == "cuda", compile_mode=mode))
    if "reduce-overhead" not in s.runner_modes:
        report.note("runner", "compiled modes not run (smoke: Inductor on CPU takes minutes)")


def probes_section(report: Report) -> None:
    s = report.settings
    report.run("probes", "probe costs", lambda: probe_bench.probe_costs(
        s.probe_backbone, "bn", s.batch, s.device, s.probe_repeats, names=s.probe_names))
    report.run("probe set", f"paper set over {s.probe_set_steps} steps", lambda: probe_bench.probe_set_overhead(
        s.probe_backbone, "bn", s.batch, s.device.type, s.probe_set_steps))


def training_section(report: Report) -> None:
    from normzoo.data.idx import DEBIAN_FASHION_MNIST, has_idx_files

    s = report.settings
    full = s.full_data and has_idx_files(DEBIAN_FASHION_MNIST)
    dataset = "fashion-mnist,download=false" if full else "fashion-mnist-mini"
    report.note("training", f"dataset: {dataset}" + ("" if full else " (the bundled 10k/2k subset)"))
    for norm in s.training_norms:
        report.run("training", f"{norm} on {dataset}", lambda norm=norm: train_one(s, norm, dataset))


def train_one(s: Settings, norm: str, dataset: str) -> dict:
    from normzoo.config import RunConfig
    from normzoo.data import load_dataset
    from normzoo.runner import Trainer

    steps = s.training_steps or 2 * len(load_dataset(dataset).train_y) // s.batch
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(backbone=s.training_backbone, norm=norm, dataset=dataset, steps=steps, batch_size=s.batch,
                           lr=0.05, device=s.device.type, out=out, eval_every=10**9, log_every=max(1, steps // 4))
        start = time.perf_counter()
        summary = Trainer(config, quiet=True).fit().summary
    return {"norm": norm, "dataset": dataset, "steps": steps, "batch": s.batch, "test_acc": summary["test_acc"],
            "train_acc": summary["train_acc"], "status": summary["status"], "wall_s": time.perf_counter() - start,
            "images_per_s": summary["images_per_s"]}


def precompile_kernels(report: Report) -> None:
    """Compile the norms' Triton kernels for this GPU in parallel before timing anything (each specialization
    would otherwise compile at its first launch, one after the other, inside the timed sections' budget)."""
    from normzoo import kernels
    from normzoo.kernels.precompile import plans_for, precompile

    s = report.settings
    if s.device.type != "cuda" or not kernels.ENABLED:
        return
    major, minor = torch.cuda.get_device_capability(s.device)
    batch_norms = [n for n in NORMS if n in BATCH_NORMS]
    plans = [p for spec in batch_norms for dtype, cl in ((torch.float32, False), (torch.bfloat16, True))
             for p in plans_for(spec, s.shapes, dtype, cl)]
    layers = vgg11_norm_shapes(s.training_backbone, s.batch)
    plans += [p for spec in ("lp:1", "lp", "lp:inf", "noisy-bn") for p in plans_for(spec, layers, torch.bfloat16, True)]
    start = time.perf_counter()
    count = len(precompile(plans, 10 * major + minor))
    report.note("norms", f"{count} kernel specializations precompiled in {time.perf_counter() - start:.0f} s")


def vgg11_norm_shapes(backbone: str, batch: int) -> list[tuple[int, ...]]:
    """The input shapes of the norm layers of ``backbone`` on a batch of 3×32×32 images."""
    from normzoo.models import build_model
    from normzoo.norms import LpNorm

    shapes = []
    model = build_model(backbone, "lp", num_classes=10, in_chans=3)
    hooks = [m.register_forward_hook(lambda m, args, out: shapes.append((batch, *args[0].shape[1:])))
             for m in model.modules() if isinstance(m, LpNorm)]
    with torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return list(dict.fromkeys(shapes))


SECTIONS = {"norms": norms_section, "runner": runner_section, "probes": probes_section, "training": training_section}


# -- the Markdown report ---------------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    meta, sections, notes = data["meta"], data["sections"], data["notes"]
    lines = ["# normzoo GPU report", "",
             f"{meta['device']}; torch {meta['torch']}, Triton {meta['triton']}, normzoo kernels "
             f"{'on' if meta['kernels'] else 'off'}; {meta['elapsed_s']} s." + (" **Smoke run (toy sizes, CPU): "
             "the numbers mean nothing.**" if meta["smoke"] else ""), "",
             "Ratios are measured side by side in this run. `!` marks a goal missed.", ""]
    if "norms" in sections:
        lines += ["## Norms: forward+backward vs nn.BatchNorm2d", "",
                  f"Goal: every built-in batch norm ≤ {TIME_GOAL}× BN's time. Peak: memory above the input during "
                  f"forward+backward, as a ratio to BN's (noisy-bn ≤ {NOISY_MEMORY_GOAL}×).", ""]
        lines += _norms_table(sections["norms"])
    if "norm memory" in sections:
        rows = sections["norm memory"]
        bn = next((r["peak_mib"] for r in rows if r["spec"] == "bn"), None)
        lines += ["", "### Peak memory of a vgg11 training step (float32) vs bn", "",
                  "| norm | peak MiB | ratio |", "|---|---|---|"]
        for r in rows:
            ratio = r["peak_mib"] / bn if bn else float("nan")
            goal = NOISY_MEMORY_GOAL if r["spec"] == "noisy-bn" else MEMORY_GOAL
            lines.append(f"| `{r['spec']}` | {r['peak_mib']:.1f} | {ratio:.3f}×{_miss(ratio > goal)} |")
    if "runner" in sections:
        lines += ["", "## Runner: normzoo vs a bare loop (images/s, medians of the windows)", "",
                  f"Goals: normzoo ≥ {RUNNER_GOAL}× bare; every norm ≥ {VS_BN_GOAL}× bn under reduce-overhead.", "",
                  "| setting | bare | normzoo | normzoo / bare | vs bn (normzoo) |", "|---|---|---|---|---|"]
        rows = sections["runner"]
        for r in rows:
            bn = next((b for b in rows if b["norm"] == "bn" and b["compile"] == r["compile"]), None)
            vs_bn = r["normzoo_img_s"] / bn["normzoo_img_s"] if bn else float("nan")
            vs_bn_miss = r["compile"] == "reduce-overhead" and vs_bn < VS_BN_GOAL
            lines.append(f"| {r['label']} | {r['bare_img_s']:,.0f} | {r['normzoo_img_s']:,.0f} | "
                         f"{r['ratio']:.3f}×{_miss(r['ratio'] < RUNNER_GOAL)} | {vs_bn:.2f}×{_miss(vs_bn_miss)} |")
    if "probes" in sections:
        for r in sections["probes"]:
            lines += ["", f"## Probes: cost in training steps (one step: {r['step_ms']:.1f} ms)", "",
                      "| probe | ms | steps | goal |", "|---|---|---|---|"]
            lines += [f"| `{name}` | {c['ms']:.1f} | {c['steps']:.2f} | {c['goal']} |"
                      for name, c in r["probes"].items()]
    for r in sections.get("probe set", []):
        lines += ["", f"Paper set (ics, landscape, activations at every=100) over {r['steps']} steps: probes "
                  f"{r['probe_time_s']:.1f} s, training {r['train_time_s']:.1f} s, **+{100 * r['added']:.1f} %** "
                  f"wall time{_miss(r['added'] > 0.15)} (goal ≤ 15 %)."]
    if "training" in sections:
        lines += ["", "## Training: one real run per norm", "",
                  "| norm | dataset | steps | test acc | train acc | status | wall s | images/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sections["training"]:
            acc = "" if r["test_acc"] is None else f"{100 * r['test_acc']:.1f} %"
            train = "" if r["train_acc"] is None else f"{100 * r['train_acc']:.1f} %"
            lines.append(f"| `{r['norm']}` | {r['dataset']} | {r['steps']} | {acc} | {train} | {r['status']} | "
                         f"{r['wall_s']:.1f} | {r['images_per_s'] or 0:,.0f} |")
    for section, texts in notes.items():
        lines += ["", f"Notes ({section}):", ""] + [f"- {t}" for t in texts]
    return "\n".join(lines) + "\n"


def _norms_table(rows: list[dict]) -> list[str]:
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: -s[2])
    head = "| norm | setting | " + " | ".join(f"{'×'.join(map(str, s))} time | peak" for s in shapes) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(shapes)]
    keyed = {(r["spec"], r["setting"], tuple(r["shape"])): r for r in rows}
    for spec, setting in dict.fromkeys((r["spec"], r["setting"]) for r in rows):
        cells = []
        for shape in shapes:
            r = keyed.get((spec, setting, shape))
            if r is None:
                cells += ["", ""]
                continue
            time_miss = spec in BATCH_NORMS and r["ratio"] > TIME_GOAL
            memory_miss = spec == "noisy-bn" and r["peak_ratio"] > NOISY_MEMORY_GOAL
            cells += [f"{r['ratio']:.2f}×{_miss(time_miss)}", f"{r['peak_ratio']:.2f}×{_miss(memory_miss)}"]
        lines.append(f"| `{spec}` | {setting} | " + " | ".join(cells) + " |")
    return lines


def _miss(missed: bool) -> str:
    return " !" if missed else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the script end to end")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole report (default 420)")
    parser.add_argument("--out", default=".", help="folder for gpu-report.md and gpu-report.json")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.smoke:
        settings = Settings.smoke()
    elif torch.cuda.is_available():
        settings = Settings(torch.device("cuda"))
    else:
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU check of the script")
    budget = Budget(args.budget)
    report = Report(settings, budget)
    try:
        precompile_kernels(report)
    except Exception as exc:  # an optimization: the kernels then compile at their first launch
        report.note("norms", f"precompiling the kernels failed ({type(exc).__name__}: {exc}); they compiled at "
                             "their first launch, inside the timed sections' budget")
    for i, name in enumerate(sections):
        budget.begin(name, sum(SECTION_SHARES[n] for n in sections[i:]))
        SECTIONS[name](report)
    elapsed = time.perf_counter() - budget.start
    json_path, md_path = report.write(Path(args.out), elapsed)
    print(md_path.read_text())
    print(f"wrote {md_path} and {json_path} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
