"""Shared by the example scripts: turn a settings dict into the ``normzoo sweep`` and ``normzoo report`` commands,
print them, and run them (so every example is two commands anyone can copy and vary)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Any


def commands(setting: dict[str, Any], out: str | None) -> list[list[str]]:
    args = ["normzoo", "sweep"]
    folder = out or str(setting["--out"])
    for key, value in setting.items():
        if key == "probes":
            for probe in value:
                args += ["--probe", probe]
        elif key != "--out":
            args += [key, str(value)]
    return [args + ["--out", folder], ["normzoo", "report", folder]]


def main(full: dict[str, Any], small: dict[str, Any], description: str) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true", help="fashion-mnist-mini on 2 CPU cores")
    parser.add_argument("--out", help=f"sweep folder (default: {full['--out']}, or {small['--out']} with --small)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    options = parser.parse_args()
    for command in commands(small if options.small else full, options.out):
        print("$", shlex.join(command), flush=True)
        if not options.dry_run:
            code = subprocess.call([sys.executable, "-m", "normzoo", *command[1:]])
            if code not in (0, 1):  # 1: some run failed; the report still shows the others
                sys.exit(code)
