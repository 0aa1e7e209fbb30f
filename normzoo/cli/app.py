"""The ``normzoo`` command group, its error handling and table printing (commands live beside it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import click

from normzoo import __version__

EPILOG = """\b
Examples:
  normzoo run --backbone vgg11 --norm lp:inf --dataset fashion-mnist-mini --steps 600
  normzoo norms                        # the norm zoo, with parameters
  normzoo build vgg11 --norm gn:8      # build a model and print its norm layers
  normzoo plugins --json               # installed plugins, versions, hooks and errors
  normzoo eval runs/<run>/best.safetensors
  normzoo sweep --norm none,bn,lp:inf --lr 0.1,0.5 --seed 0,1 --out sweeps/lp   # a grid of runs
  normzoo report sweeps/lp             # report.html + report.md: smoothness vs speed per scheme
"""


class NormzooGroup(click.Group):
    """Every error becomes one line on stderr and a non-zero exit; ``--debug`` shows the traceback instead.

    Exit code 2: bad input (a spec, an option, a file); 1: the run could not go on (out of memory, a full disk,
    a plugin's code failing, or a bug in normzoo, which the line says).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("NORMZOO_DEBUG"):
                raise
            from normzoo.errors import describe_error

            message, code = describe_error(exc)
            click.echo(f"Error: {message}", err=True)
            ctx.exit(code)


@click.group(cls=NormzooGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="normzoo")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def cli(debug: bool) -> None:
    """normzoo: train any backbone with any normalization and measure why it helps.

    Norms, backbones, datasets and probes come from plugins (built-ins included)
    and are named by specs, family[:positional][,key=value...]:

    \b
      bn   lp:inf   lp:1,centered=true   gn:32   noisy-bn:mu=0.5,sigma=1.25
    """
    if debug:
        os.environ["NORMZOO_DEBUG"] = "1"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table; the last column wraps to the terminal width."""
    if not rows:
        return "(none)"
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns[:-1])]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, [*widths, 0])).rstrip()]
    for r in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, [*widths, 0])).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="normzoo")
