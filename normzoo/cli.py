"""The ``normzoo`` command line. Heavy imports (torch, timm) happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from normzoo import __version__
from normzoo.errors import NormzooError

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


def _listing(kind: str, as_json: bool) -> None:
    from normzoo.plugins import registry

    rows = []
    for entry in registry(kind):
        row = entry.as_dict()
        row["parameters"] = ", ".join(p.describe() for p in entry.params)
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_table(rows, ["name", "plugin", "summary"]))
    params = [r for r in rows if r["parameters"]]
    if params:
        click.echo("\nParameters (spec: name[:positional][,key=value...]):")
        for row in params:
            pos = f"  [positional: {row['positional']}]" if row["positional"] else ""
            click.echo(f"  {row['name']}: {row['parameters']}{pos}")


def _listing_command(kind: str, help_text: str) -> click.Command:
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
    def command(as_json: bool) -> None:
        _listing(kind, as_json)

    command.__doc__ = help_text
    return cli.command(kind)(command)


_listing_command("norms", "List registered normalization layers and their spec parameters.\n\n"
                          "\b\nExample:\n  normzoo norms --json | jq '.[].name'")
_listing_command("backbones", "List registered backbones (timm:<model> takes any timm model).")
_listing_command("datasets", "List registered datasets.")
_listing_command("probes", "List registered probe metrics and their parameters.")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
def plugins(as_json: bool) -> None:
    """List loaded plugins with versions, hooks and any load errors.

    \b
    NORMZOO_LOAD_PLUGINS=a,b loads only those external plugins ('' loads none);
    NORMZOO_STRICT_PLUGINS=1 turns plugin errors into exceptions.
    """
    from normzoo.plugins import get_plugins

    manager = get_plugins()
    for kind in ("norms", "backbones", "datasets", "probes"):
        manager.registry(kind)  # calling the hooks surfaces errors raised inside them
    rows = [info.as_dict() for info in manager.info.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["hooks"] = ", ".join(h.removeprefix("register_") for h in row["hooks"]) or "-"
        row["errors"] = "; ".join(row["errors"]) or "ok"
    click.echo(format_table(rows, ["name", "version", "source", "hooks", "errors"]))


@cli.command()
@click.argument("backbone", default="vgg11")
@click.option("--norm", default="bn", show_default=True, help="Norm spec, e.g. lp:inf or gn:8.")
@click.option("--num-classes", default=10, show_default=True, type=click.IntRange(1))
@click.option("--in-chans", default=3, show_default=True, type=click.IntRange(1))
@click.option("--input-size", default=32, show_default=True, type=click.IntRange(1),
              help="Height/width of the test input pushed through the model.")
def build(backbone: str, norm: str, num_classes: int, in_chans: int, input_size: int) -> None:
    """Build a model with a norm injected, run one forward pass and list its norm layers.

    \b
    Example:
      normzoo build timm:resnet18 --norm lp:inf --in-chans 1
    """
    import torch

    from normzoo.placement import find_norms
    from normzoo.models import build_model

    model = build_model(backbone, norm, num_classes=num_classes, in_chans=in_chans)
    config = model.normzoo_config
    params = sum(p.numel() for p in model.parameters())
    shape = (2, in_chans, input_size, input_size) if "dln" not in config["backbone"] else (2, num_classes)
    with torch.no_grad():
        out = model.eval()(torch.randn(*shape))
    norms = find_norms(model)
    click.echo(f"backbone  {config['backbone']}\nnorm      {config['norm']}\n"
               f"params    {params:,}\nforward   {tuple(shape)} -> {tuple(out.shape)}\n"
               f"norms     {len(norms)} layers: {', '.join(sorted({type(m).__name__ for _, m in norms})) or '-'}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="normzoo")


import normzoo.cli_run  # noqa: E402,F401  (registers run/eval/inspect on the group; imports no torch)
import normzoo.cli_sweep  # noqa: E402,F401  (sweep/report)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
