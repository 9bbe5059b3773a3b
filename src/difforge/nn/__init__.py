"""Denoiser networks: the configurable U-Net family.

>>> from difforge.nn import UNet, UNetConfig
>>> model = UNet(UNetConfig.preset("tiny"))
"""

from difforge.nn.config import BLOCK_KINDS, PRESETS, UNetConfig
from difforge.nn.unet import UNet

__all__ = ["BLOCK_KINDS", "PRESETS", "UNet", "UNetConfig"]
