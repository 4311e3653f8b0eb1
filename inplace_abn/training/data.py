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


def train_transform(config: TrainConfig):
    from ..data import ClassificationTrainTransform, ColorJitter, SegmentationTrainTransform

    jitter = ColorJitter() if config.color_jitter else None
    if config.task == "classification":
        return ClassificationTrainTransform(size=config.crop_size[0], jitter=jitter)
    return SegmentationTrainTransform(tuple(config.crop_size), tuple(config.scale_range), jitter=jitter)


def build_dataset(config: TrainConfig, split: str, train: bool, eval_maps: bool = False, transform=None,
                  num_samples: Optional[int] = None):  # fmt: skip
    """The dataset of ``split``; ``train`` gives it the training augmentation, otherwise ``transform``
    (default: normalisation only / the center crop)."""
    from .. import data

    if train:
        transform = train_transform(config)
    if config.dataset == "synthetic":
        height, width = config.synthetic_size
        count = config.synthetic_samples if num_samples is None else num_samples
        return data.SyntheticCityscapes(count, height, width, seed=config.seed, split=split, transform=transform,
                                        eval_maps=eval_maps, cache=train)  # fmt: skip
    if config.dataset == "cityscapes":  # split "train+train_extra": fine + coarse
        return data.CityscapesDataset(config.root, split, transform=transform, eval_maps=eval_maps)
    if config.dataset == "kitti":
        return data.KittiDataset(config.root, split, transform=transform, eval_maps=eval_maps)
    if config.dataset == "vistas":
        return data.VistasDataset(config.root, split, transform=transform)
    if transform is None:
        transform = data.ClassificationEvalTransform(size=config.crop_size[0], resize=int(config.crop_size[0] * 8 / 7))
    return data.ImageFolderDataset(config.root, split, transform=transform)


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
