"""Bjorck et al. 2018, "Understanding Batch Normalization": BatchNorm lets a network train at learning rates
where the same network without it diverges or stalls. One sweep over learning rates, with and without BN.

    python examples/bjorck2018.py                 # CIFAR-10, ResNet-110 with augmentation (GPU)
    python examples/bjorck2018.py --small         # fashion-mnist-mini on 2 CPU cores, about 10 minutes

Probes: the relative loss after one step along −g against the step size (``step-loss``: where the ratio stays
below 1 a learning rate is usable), per-layer gradient norms (``grad-norms``) and activation/gradient scale
through depth (``depth-scaling``). The report adds final accuracy against learning rate per norm.
"""

from __future__ import annotations

from _sweep_example import main

LRS = "0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1,3"
FULL = {
    "--norm": "bn,none", "--backbone": "resnet110", "--dataset": "cifar10", "--lr": LRS, "--seed": "0,1",
    "--epochs": "20", "--augment": "true", "--schedule": "cosine", "--log-every": "50",
    "probes": ["step-loss:every=1000", "grad-norms:every=1000", "depth-scaling:every=1000"],
    "--out": "sweeps/bjorck2018",
}
SMALL = {
    "--norm": "bn,none", "--backbone": "vgg11,width=0.25", "--dataset": "fashion-mnist-mini",
    "--lr": "0.003,0.01,0.03,0.1,0.3,1,3", "--seed": "0", "--steps": "300", "--schedule": "constant",
    "--momentum": "0.9", "--eval-every": "100", "--log-every": "20", "--device": "cpu", "--jobs": "2",
    "probes": ["step-loss:every=100", "grad-norms:every=100", "depth-scaling:every=100"],
    "--out": "examples/results/bjorck2018-small",
}

if __name__ == "__main__":
    main(FULL, SMALL, __doc__.split("\n\n")[0])
