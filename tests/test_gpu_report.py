"""``benchmarks/gpu.py --smoke``: the GPU report's every section, end to end, at toy sizes on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_report_smoke_run_writes_every_section(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
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
