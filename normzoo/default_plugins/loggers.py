"""Built-in experiment trackers, registered through the public ``register_loggers`` hook."""

from __future__ import annotations

from normzoo.hookspecs import hookimpl


@hookimpl
def register_loggers(register):
    from normzoo.loggers.tensorboard import TensorBoardLogger
    from normzoo.loggers.wandb import WandbLogger

    register("tensorboard", TensorBoardLogger,
             summary="TensorBoard event files in <run>/tensorboard: train/eval scalars, probe/<name>/<field>, "
                     "the config as hparams (pip install 'normzoo[tensorboard]').",
             reference="https://www.tensorflow.org/tensorboard")
    register("wandb", WandbLogger,
             summary="Weights & Biases run in <run>/wandb, offline unless mode=online (pip install 'normzoo[wandb]').",
             reference="https://docs.wandb.ai")
