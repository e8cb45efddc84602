"""Networks: the DDPM U-Net and its layers."""

from .unet import UNet, count_parameters

__all__ = ["UNet", "count_parameters"]
