"""Reproduce Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", Figures 1-4 and the
ℓp-normalization figures, as one normzoo sweep and its report.

    python examples/santurkar2018.py                 # CIFAR-10, VGG11, the paper's setting (GPU; hours)
    python examples/santurkar2018.py --small         # fashion-mnist-mini on 2 CPU cores, about 30 minutes

What runs (the paper's §A setting, preset ``santurkar2018``: plain SGD, constant learning rate, batch 128, no
augmentation, Glorot init):
- norms: none, bn, noisy-bn (Algorithm 1), and the ℓ1 / ℓ2 / ℓ∞ normalizations of §3.3;
- learning rates 0.1 and 0.5 (Fig. 1 uses both), several seeds;
- probes: the loss landscape along the gradient (Fig. 4, 12, 13), internal covariate shift (Fig. 3), activation
  statistics (Fig. 2/8) and the top Hessian eigenvalue.

The script only builds the two commands below, prints them, and runs them; copy them to vary anything. Running it
again resumes: finished runs are skipped, interrupted ones continue from their checkpoints.
"""

from __future__ import annotations

from _sweep_example import main

NORMS = "none,bn,noisy-bn,lp:1,lp:2,lp:inf"
FULL = {
    "--norm": NORMS, "--backbone": "vgg11", "--dataset": "cifar10", "--preset": "santurkar2018", "--steps": "15000",
    "--lr": "0.1,0.5", "--seed": "0,1,2", "--eval-every": "500", "--log-every": "50",
    "probes": ["landscape:every=500", "ics:every=1000", "activations:every=500", "hessian:every=3000,iters=20"],
    "--out": "sweeps/santurkar2018",
}
# Same grid and probes, scaled to finish in about 30 minutes on 2 CPU cores: a quarter-width VGG11 on the
# bundled 10k-image Fashion-MNIST subset, 600 steps (about 8 epochs), two seeds, two runs at a time.
SMALL = {
    "--norm": NORMS, "--backbone": "vgg11,width=0.25", "--dataset": "fashion-mnist-mini", "--preset": "santurkar2018",
    "--steps": "600", "--lr": "0.1,0.5", "--seed": "0,1", "--eval-every": "100", "--log-every": "20",
    "--device": "cpu", "--jobs": "2",
    "probes": ["landscape:every=50", "ics:every=100", "activations:every=50",
               "hessian:every=200,iters=10,trace_samples=4"],
    "--out": "examples/results/santurkar2018-small",
}


if __name__ == "__main__":
    main(FULL, SMALL, __doc__.split("\n\n")[0])
