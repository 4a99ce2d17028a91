"""Initialisation techniques."""

from lightning_techniques.init.lsuv import LSUVInit, lsuv_init
from lightning_techniques.init.weight_init import WeightInit, init_weights

__all__ = ["LSUVInit", "WeightInit", "init_weights", "lsuv_init"]
