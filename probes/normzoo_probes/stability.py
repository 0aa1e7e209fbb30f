"""The stability threshold on λ_max for SGD, as numbers only (no torch): shared by the ``sharpness`` probe, which
reads the optimizer, and the reports, which read a run's config (see :mod:`normzoo_probes.sharpness` for the
derivations)."""

from __future__ import annotations

import math


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
                  ) -> tuple[float, str, str | None]:
    """(threshold on λ_max, the formula used, a note when there is none) for PyTorch's SGD."""
    if not (lr > 0 and math.isfinite(lr)):
        return math.nan, "none", f"learning rate {lr}: no step, no stability threshold"
    if momentum == 0:
        return 2 / lr, "2/lr", None
    if momentum >= 1:
        return math.nan, "none", f"momentum {momentum} ≥ 1: heavy ball is unstable at every curvature"
    if nesterov:
        return ((2 + 2 * momentum) / ((1 + 2 * momentum) * lr),
                "(2+2*momentum)/((1+2*momentum)*lr) (Nesterov)", None)
    if dampening >= 1:
        return math.nan, "none", f"dampening {dampening} ≥ 1: the step ignores the gradient"
    if dampening:
        return (2 + 2 * momentum) / ((1 - dampening) * lr), "(2+2*momentum)/((1-dampening)*lr)", None
    return (2 + 2 * momentum) / lr, "(2+2*momentum)/lr", None


def config_threshold(config: dict | None) -> float:
    """The threshold for a run's config.json (its peak learning rate and momentum); NaN for other optimizers or
    an unknown config."""
    if not config or config.get("optimizer", "sgd") != "sgd":
        return math.nan
    try:
        return sgd_threshold(float(config["lr"]), float(config.get("momentum", 0.0)))[0]
    except (KeyError, TypeError, ValueError):
        return math.nan
