"""The plugin module the entry point names: one @hookimpl function per kind of thing it adds."""

from __future__ import annotations

from typing import Any

from normzoo import hookimpl


@hookimpl
def register_norms(register: Any) -> None:
    from normzoo_example.mean_bn import MeanOnlyBatchNorm

    register("mean-bn", MeanOnlyBatchNorm, summary="mean-only batch norm: subtract the batch mean, no scaling",
             reference="Salimans & Kingma 2016, arXiv:1602.07868")


@hookimpl
def register_probes(register: Any) -> None:
    from normzoo_example.weight_norm import WeightNormProbe

    register(WeightNormProbe.name, WeightNormProbe, summary=WeightNormProbe.summary,
             reference=WeightNormProbe.reference)
