"""The settings of one training run: a dataclass that reads a JSON file and command-line overrides,
and is stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

TASKS = ("segmentation", "classification")
DATASETS = ("synthetic", "cityscapes", "vistas", "kitti", "imagefolder")
NORMS = ("inplace_abn", "batchnorm", "abn")
AMP_MODES = ("none", "bf16", "fp16")


@dataclasses.dataclass
class TrainConfig:
    # network
    network: str = "deeplabv3_resnet18"
    norm: str = "inplace_abn"  # inplace_abn | batchnorm (BatchNorm2d + activation) | abn
    activation: str = "leaky_relu"
    activation_param: float = 0.01
    width_multiplier: float = 1.0
    output_stride: Optional[int] = None  # default: 16 for segmentation, 32 for classification
    # data
    dataset: str = "synthetic"
    root: Optional[str] = None
    train_split: Optional[str] = None  # default per dataset: train / training
    val_split: Optional[str] = None
    synthetic_samples: int = 400
    synthetic_size: Tuple[int, int] = (96, 192)  # (height, width) of the rendered scenes
    crop_size: Tuple[int, int] = (96, 192)  # segmentation crops; classification uses crop_size[0]
    scale_range: Tuple[float, float] = (0.75, 1.5)
    color_jitter: bool = True
    workers: int = 0
    # optimization
    batch_size: int = 8  # per process
    steps: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # bookkeeping
    out_dir: str = "out/train"
    checkpoint_every: int = 500
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True

    @property
    def task(self) -> str:
        return "segmentation" if self.network.startswith("deeplabv3_") else "classification"

    @property
    def stride(self) -> int:
        if self.output_stride is not None:
            return self.output_stride
        return 16 if self.task == "segmentation" else 32

    def validate(self) -> "TrainConfig":
        def check(value, allowed, what):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")

        check(self.norm, NORMS, "norm")
        check(self.dataset, DATASETS, "dataset")
        check(self.amp, AMP_MODES, "amp")
        check(self.device, ("auto", "cpu", "cuda"), "device")
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
