"""Lightning glue: the DiffusionModule and its callbacks (EMA, sample grids, FID during training, checkpoints)."""

from .ema import EMA
from .fid_callback import FIDCallback
from .module import DiffusionModule
from .sample_grid import SampleGridCallback

__all__ = ["DiffusionModule", "EMA", "SampleGridCallback", "FIDCallback"]
