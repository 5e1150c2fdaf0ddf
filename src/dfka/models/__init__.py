"""Block-structured classifiers: B blocks plus a head, with queryable per-level shapes."""

from dfka.models.base import BlockClassifier, freeze, frozen_bn_stats
from dfka.models.lenet import lenet5
from dfka.models.profile import count_flops, count_params
from dfka.models.registry import available, build_model, parse_arch, register
from dfka.models.resnet import resnet
from dfka.models.resnet18 import resnet18
from dfka.models.vgg import vgg

__all__ = [
    "BlockClassifier",
    "available",
    "build_model",
    "count_flops",
    "count_params",
    "freeze",
    "frozen_bn_stats",
    "lenet5",
    "parse_arch",
    "register",
    "resnet",
    "resnet18",
    "vgg",
]
