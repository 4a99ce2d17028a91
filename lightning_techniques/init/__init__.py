"""Initialisation techniques."""

from lightning_techniques.init.lsuv import LSUVInit, lsuv_init

__all__ = ["LSUVInit", "lsuv_init"]
