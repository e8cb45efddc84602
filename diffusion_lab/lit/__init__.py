"""Lightning glue: the DiffusionModule and its callbacks."""

from .callbacks import SampleGridCallback, ema_module, save_grid
from .ema import EMA
from .module import DiffusionModule

__all__ = ["DiffusionModule", "EMA", "SampleGridCallback", "ema_module", "save_grid"]
