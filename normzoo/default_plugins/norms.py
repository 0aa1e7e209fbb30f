"""Built-in norms, registered through the public ``register_norms`` hook like any plugin's."""

from __future__ import annotations

from normzoo.hookspecs import hookimpl


@hookimpl
def register_norms(register):
    from normzoo import norms

    register("none", norms.NoNorm, summary="No normalization (identity); removes norms from a model.")
    register("bn", norms.BatchNorm, summary="Batch normalization.",
             reference="Ioffe & Szegedy 2015, arXiv:1502.03167")
    register("noisy-bn", norms.NoisyBatchNorm,
             summary="BatchNorm followed by per-step random channel-wise shift/scale noise (Algorithm 1).",
             reference="Santurkar et al. 2018, arXiv:1805.11604, Algorithm 1")
    register("lp", norms.LpNorm, positional="p",
             summary="Batch ℓp normalization: subtract the batch mean, divide by the power mean M_p.",
             reference="Santurkar et al. 2018, arXiv:1805.11604, §3.3")
    register("gn", norms.GroupNorm, positional="groups", summary="Group normalization.",
             reference="Wu & He 2018, arXiv:1803.08494")
    register("ln", norms.LayerNorm, summary="Layer normalization per sample over C, H, W.",
             reference="Ba et al. 2016, arXiv:1607.06450")
    register("in", norms.InstanceNorm, summary="Instance normalization per sample and channel over H, W.",
             reference="Ulyanov et al. 2016, arXiv:1607.08022")
    register("l1-bn", norms.L1BatchNorm,
             summary="L1 batch norm: (x-µ) / (sqrt(π/2)·mean|x-µ|).",
             reference="Hoffer et al. 2018, arXiv:1803.01814")
    register("topk-bn", norms.TopKBatchNorm, positional="k",
             summary="Top-k L∞ batch norm: scale by the mean of the k largest |x-µ| per channel.",
             reference="Hoffer et al. 2018, arXiv:1803.01814")
