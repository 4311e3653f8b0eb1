"""The settings of one training run: a dataclass that reads a JSON file and command-line overrides,
and is stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

TASKS = ("segmentation", "classification")
DATASETS = ("synthetic", "cityscapes", "vistas", "kitti", "imagefolder")
NORMS = ("inplace_abn", "batchnorm", "abn")
AMP_MODES = ("none", "bf16", "fp16")
LR_SCHEDULES = ("poly", "step", "constant")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. In a JSON file, ``notes`` (a string or a list of strings) carries the
    comments JSON cannot: it is kept in the checkpoints and changes nothing."""

    # network
    network: str = "deeplabv3_resnet18"
    norm: str = "inplace_abn"  # inplace_abn | batchnorm (BatchNorm2d + activation) | abn
    sync_norm: bool = True  # under torchrun: statistics over all processes (InPlaceABNSync); false: per process
    activation: str = "leaky_relu"
    activation_param: float = 0.01
    width_multiplier: float = 1.0
    output_stride: Optional[int] = None  # default: 16 for segmentation, 32 for classification
    network_options: Dict[str, Any] = dataclasses.field(default_factory=dict)  # more builder keyword arguments
    init_from: Optional[str] = None  # checkpoint whose matching weights start the run (e.g. an ImageNet backbone)
    # data
    dataset: str = "synthetic"
    root: Optional[str] = None
    train_split: Optional[str] = None  # default per dataset: train / training
    val_split: Optional[str] = None
    synthetic_samples: int = 400
    synthetic_val_samples: Optional[int] = None  # default: synthetic_samples // 5
    synthetic_size: Tuple[int, int] = (96, 192)  # (height, width) of the rendered scenes
    crop_size: Tuple[int, int] = (96, 192)  # segmentation crops; classification uses crop_size[0]
    scale_range: Tuple[float, float] = (0.75, 1.5)
    longest_side: Optional[int] = None  # segmentation: images resized to this longest side first (train and eval)
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, RGB in [0, 1]
    image_std: Tuple[float, float, float] = IMAGENET_STD
    color_jitter: bool = True
    # brightness, contrast, saturation (factors in 1 +- value), hue (a rotation of +- value turns)
    color_jitter_amounts: Tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.02)
    lighting: float = 0.0  # classification: std of AlexNet's PCA lighting noise (0: off)
    workers: int = 0
    # optimization
    batch_size: int = 8  # per process
    global_batch_size: Optional[int] = None  # if set: split over the processes (batch_size = this / world size)
    steps: int = 1000
    epochs: Optional[float] = None  # if set, the run's length in passes over the training set (steps is ignored)
    lr: float = 0.01
    lr_schedule: str = "poly"  # poly | step | constant, after the warmup
    poly_power: float = 0.9  # poly: lr * (1 - step / steps) ** power (power 1: linear decay to 0)
    lr_milestones: Tuple[float, ...] = ()  # step: epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # linear warmup from warmup_start_factor * lr over this many steps
    warmup_start_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False  # weight decay also on norm weights and biases (the original's ImageNet runs)
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # bookkeeping
    out_dir: str = "out/train"
    checkpoint_every: int = 500
    val_every: int = 0  # steps between validations (0: none); the best one is kept as best.pt
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    notes: Tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return "segmentation" if self.network.startswith("deeplabv3_") else "classification"

    @property
    def stride(self) -> int:
        if self.output_stride is not None:
            return self.output_stride
        return 16 if self.task == "segmentation" else 32

    @property
    def val_metric(self) -> str:
        """The validation score that picks the best checkpoint (higher is better)."""
        return "mean_iou" if self.task == "segmentation" else "top1"

    def validate(self) -> "TrainConfig":
        def check(value, allowed, what):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")

        check(self.norm, NORMS, "norm")
        check(self.dataset, DATASETS, "dataset")
        check(self.amp, AMP_MODES, "amp")
        check(self.device, ("auto", "cpu", "cuda"), "device")
        check(self.lr_schedule, LR_SCHEDULES, "lr_schedule")
        if self.dataset != "synthetic" and not self.root:
            raise ValueError(f"dataset {self.dataset!r} needs a root folder (--root)")
        if (self.dataset == "imagefolder") != (self.task == "classification"):
            raise ValueError(
                f"network {self.network!r} is a {self.task} network but dataset {self.dataset!r} is "
                f"{'classification' if self.dataset == 'imagefolder' else 'segmentation'} data"
            )
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 (or null to count steps), got {self.epochs}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1 (or null), got {self.global_batch_size}")
        if self.lr_schedule == "step" and not self.lr_milestones:
            raise ValueError("lr_schedule 'step' needs lr_milestones: the epochs where lr is multiplied by lr_gamma")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing, got {list(self.lr_milestones)}")
        if not 0 <= self.warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must lie in [0, 1], got {self.warmup_start_factor}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values (std > 0), got {self.image_mean}, "
                             f"{self.image_std}")  # fmt: skip
        if len(self.color_jitter_amounts) != 4:
            raise ValueError(f"color_jitter_amounts needs 4 values (brightness, contrast, saturation, hue), "
                             f"got {list(self.color_jitter_amounts)}")  # fmt: skip
        if self.longest_side is not None and self.longest_side < 1:
            raise ValueError(f"longest_side must be >= 1 (or null), got {self.longest_side}")
        if not isinstance(self.network_options, dict):
            raise ValueError(f"network_options must be a JSON object of builder arguments, "
                             f"got {self.network_options!r}")  # fmt: skip
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> List[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        converted = {}
        for name, value in values.items():
            if name == "notes" and isinstance(value, str):
                value = [value]
            if isinstance(value, list):
                value = tuple(value)
            converted[name] = value
        return cls(**converted)

    @classmethod
    def from_json(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> "TrainConfig":
        try:
            with open(path, encoding="utf-8") as file:
                values = json.load(file)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read config {path}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of settings")
        values.update(overrides or {})
        return cls.from_dict(values, path)
