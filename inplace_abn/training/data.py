"""Datasets of a run, and the sampler that makes the data order and the augmentation a function of
(seed, epoch, position), so that a resumed run reads exactly the batches the uninterrupted one would."""

from __future__ import annotations

import zlib
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import Dataset, DistributedSampler

from .config import TrainConfig

DEFAULT_SPLITS = {
    "synthetic": ("train", "val"),
    "cityscapes": ("train", "val"),
    "vistas": ("training", "validation"),
    "kitti": ("train", "val"),  # val: every 5th training image (KITTI has no validation split)
    "imagefolder": ("train", "val"),
}


def splits(config: TrainConfig) -> Tuple[str, str]:
    train_split, val_split = DEFAULT_SPLITS[config.dataset]
    return config.train_split or train_split, config.val_split or val_split


class ResizeLongestSide:
    """Scale an image so that its longest side is ``size`` pixels (bilinear), then apply ``transform``.
    With ``resize_label`` the label follows (nearest: training crops); without, it stays at the
    original size and predictions are resized to it (evaluation, as the original's test script)."""

    def __init__(self, transform, size: int, resize_label: bool):
        self.transform, self.size, self.resize_label = transform, size, resize_label

    def __call__(self, image, label):
        from ..data.transforms import resize_image, resize_label

        scale = self.size / max(image.shape[:2])
        height, width = (max(1, int(dim * scale)) for dim in image.shape[:2])
        image = resize_image(image, height, width)
        if self.resize_label and label is not None:
            label = resize_label(label, height, width)
        return self.transform(image, label)


class WithLighting:
    """A classification transform followed by :class:`~inplace_abn.data.transforms.Lighting`."""

    def __init__(self, transform, lighting):
        self.transform, self.lighting = transform, lighting

    def __call__(self, image):
        return self.lighting(self.transform(image))


def train_transform(config: TrainConfig):
    from ..data import ClassificationTrainTransform, ColorJitter, SegmentationTrainTransform
    from ..data.transforms import Lighting

    jitter = ColorJitter(*config.color_jitter_amounts) if config.color_jitter else None
    mean, std = tuple(config.image_mean), tuple(config.image_std)
    if config.task == "classification":
        transform = ClassificationTrainTransform(size=config.crop_size[0], jitter=jitter, mean=mean, std=std)
        return WithLighting(transform, Lighting(config.lighting, std)) if config.lighting > 0 else transform
    transform = SegmentationTrainTransform(tuple(config.crop_size), tuple(config.scale_range), jitter=jitter,
                                           mean=mean, std=std)  # fmt: skip
    return ResizeLongestSide(transform, config.longest_side, resize_label=True) if config.longest_side else transform


def eval_transform(config: TrainConfig, ten_crop: bool = False):
    """What validation and ``inplace-abn evaluate`` apply: the run's normalisation; classification:
    the center crop (``ten_crop``: ten crops) of images resized by 8/7 of it; segmentation: whole
    images, resized to ``longest_side`` when set (labels stay at their size)."""
    from ..data import ClassificationEvalTransform, SegmentationEvalTransform

    mean, std = tuple(config.image_mean), tuple(config.image_std)
    if config.task == "classification":
        size = config.crop_size[0]
        return ClassificationEvalTransform(size=size, resize=int(round(size * 8 / 7)), ten_crop=ten_crop, mean=mean,
                                           std=std)  # fmt: skip
    transform = SegmentationEvalTransform(mean=mean, std=std)
    return ResizeLongestSide(transform, config.longest_side, resize_label=False) if config.longest_side else transform


def build_dataset(config: TrainConfig, split: str, train: bool, eval_maps: bool = False, transform=None,
                  num_samples: Optional[int] = None):  # fmt: skip
    """The dataset of ``split``; ``train`` gives it the training augmentation, otherwise ``transform``
    (default: :func:`eval_transform`). ``num_samples``: synthetic data only (default: the config's
    training or validation size)."""
    from .. import data

    if train:
        transform = train_transform(config)
    elif transform is None:
        transform = eval_transform(config)
    if config.dataset == "synthetic":
        height, width = config.synthetic_size
        if num_samples is None:
            num_samples = config.synthetic_samples if train else synthetic_val_samples(config)
        return data.SyntheticCityscapes(num_samples, height, width, seed=config.seed, split=split, transform=transform,
                                        eval_maps=eval_maps, cache=train)  # fmt: skip
    if config.dataset == "cityscapes":  # split "train+train_extra": fine + coarse
        return data.CityscapesDataset(config.root, split, transform=transform, eval_maps=eval_maps)
    if config.dataset == "kitti":
        return data.KittiDataset(config.root, split, transform=transform, eval_maps=eval_maps)
    if config.dataset == "vistas":
        return data.VistasDataset(config.root, split, transform=transform)
    return data.ImageFolderDataset(config.root, split, transform=transform)


def synthetic_val_samples(config: TrainConfig) -> int:
    if config.synthetic_val_samples is not None:
        return config.synthetic_val_samples
    return max(1, config.synthetic_samples // 5)


def num_classes_of(dataset) -> int:
    return int(dataset.num_classes)


class SeededSamples(Dataset):
    """Wraps a dataset whose augmentation draws from torch's global generator: sample ``(epoch,
    index)`` is produced under a generator seeded from ``(seed, epoch, index)``, whatever the process,
    worker or order. The caller's generator state is left untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{index}".encode()))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` (a shuffled, per-epoch permutation shared by all ranks, sharded) that
    yields ``(epoch, index)`` for :class:`SeededSamples` and can start in the middle of an epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Begin ``epoch`` at this rank's ``start``-th sample."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start
