"""Lightning glue: the DiffusionModule and its callbacks."""

from .callbacks import SampleGridCallback, ema_module, save_grid
from .module import DiffusionModule

__all__ = ["DiffusionModule", "SampleGridCallback", "ema_module", "save_grid"]
