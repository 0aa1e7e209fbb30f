"""Registers the probes through normzoo's ``register_probes`` hook (entry point ``normzoo = probes``)."""

from __future__ import annotations

from normzoo import hookimpl


@hookimpl
def register_probes(register) -> None:
    from normzoo_probes.activations import ActivationsProbe
    from normzoo_probes.depth import DepthScalingProbe, GradNormsProbe
    from normzoo_probes.effective_lr import EffectiveLRProbe
    from normzoo_probes.hessian import HessianProbe
    from normzoo_probes.ics import ICSProbe
    from normzoo_probes.landscape import LandscapeProbe
    from normzoo_probes.sharpness import SharpnessProbe
    from normzoo_probes.step_loss import StepLossProbe

    for probe in (ICSProbe, LandscapeProbe, ActivationsProbe, GradNormsProbe, DepthScalingProbe, StepLossProbe,
                  HessianProbe, SharpnessProbe, EffectiveLRProbe):
        register(probe.name, probe, summary=probe.summary, reference=probe.reference)
