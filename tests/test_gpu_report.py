"""``benchmarks/gpu.py --smoke``: the GPU report's every section, end to end, at toy sizes on the CPU."""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
from pathlib import Path

import pytest

from normzoo.forked_run import exit_with

ROOT = Path(__file__).resolve().parents[1]


def run_script_forked(script: Path, args: list[str], log: Path) -> int:
    """``python SCRIPT ARGS`` as a fork of this process, which has imported torch and what the script imports from
    normzoo already (a fresh interpreter spends seconds on that); its output goes to ``log``. The exit status."""

    def script_in_child() -> None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
        sys.argv = [str(script), *args]
        runpy.run_path(str(script), run_name="__main__")

    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        exit_with(script_in_child)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.slow
def test_gpu_report_smoke_run_writes_every_section(tmp_path):
    log = tmp_path / "smoke.log"
    code = run_script_forked(ROOT / "benchmarks" / "gpu.py", ["--smoke", "--out", str(tmp_path)], log)
    assert code == 0, log.read_text()[-6000:]
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    sections, notes = report["sections"], report["notes"]
    assert set(sections) == {"norms", "norm memory", "runner", "probes", "probe set", "training"}
    assert not [n for texts in notes.values() for n in texts if n.startswith(("error", "skipped"))], notes
    settings = {row["setting"] for row in sections["norms"]}
    assert settings == {"fp32", "bf16+cl", "bf16+cl compiled"}
    for row in sections["norms"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and math.isfinite(row["peak_ratio"]), row
    assert {row["norm"] for row in sections["runner"]} == {"bn", "lp:inf"}
    assert all(row["bare_img_s"] > 0 and row["normzoo_img_s"] > 0 for row in sections["runner"])
    assert {"activations", "ics"} <= set(sections["probes"][0]["probes"])
    assert all(row["status"] == "finished" and 0 <= row["test_acc"] <= 1 for row in sections["training"])
    markdown = (tmp_path / "gpu-report.md").read_text()
    for heading in ("## Norms", "## Runner", "## Probes", "## Training"):
        assert heading in markdown
    assert "Smoke run" in markdown
