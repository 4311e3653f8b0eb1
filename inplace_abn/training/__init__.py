"""Training and evaluation: the loop (SGD, poly LR, mixed precision, torchrun + InPlaceABNSync),
atomic checkpoints with exact resume, CSV / TensorBoard logs and curve plots, and the evaluation of
segmentation (single / multi-scale + flip, Cityscapes metrics) and classification (center / 10-crop).

Needs the data and metrics extras (numpy, pillow, tqdm; matplotlib for plots); the core library
never imports it.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "load_checkpoint", "save_checkpoint", "train"]
