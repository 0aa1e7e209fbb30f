"""``normzoo norms``, ``backbones``, ``datasets``, ``probes``, ``plugins`` and ``build``: what is installed.

Listings read the registries, which come from the registry cache when it is valid, so they import no torch.
"""

from __future__ import annotations

import json

import click

from normzoo import hookspecs
from normzoo.cli.app import cli, format_table


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
_listing_command("loggers", "List registered experiment trackers (--log): tensorboard, wandb, plugins'.")


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
    for kind in hookspecs.KINDS:
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


