"""Built-in backbones, registered through the public ``register_backbones`` hook."""

from __future__ import annotations

from functools import partial

from normzoo.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from normzoo.backbones import dln, resnet_cifar, timm_models, vgg

    for depth, cfg in vgg.DEPTH_TO_CFG.items():
        register(f"vgg{depth}", partial(vgg.build_vgg, cfg),
                 summary=f"CIFAR-style VGG-{depth} (torchvision config '{cfg}'), norm after each conv.",
                 reference="Simonyan & Zisserman 2015; Santurkar et al. 2018 setup")
    for depth in resnet_cifar.DEPTHS:
        register(f"resnet{depth}", partial(resnet_cifar.build_resnet, depth),
                 summary=f"CIFAR ResNet-{depth} (3 stages, option-A shortcuts).",
                 reference="He et al. 2016, arXiv:1512.03385 §4.2")
    register("timm", timm_models.build_timm, positional="model",
             summary="Any timm model by name (timm:resnet18); its norms are swapped for the chosen one.",
             reference="https://github.com/huggingface/pytorch-image-models")
    register("dln", dln.build_dln, summary="Deep linear network (25 layers of 10x10 by default), squared loss.",
             reference="Santurkar et al. 2018, arXiv:1805.11604, §A.2")
