"""Classification data in the ImageFolder layout: ``<root>/<split>/<class>/<image>``."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch

from .io import IMAGE_EXTENSIONS, DataError, list_files, open_image
from .transforms import ClassificationEvalTransform


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(image tensor, class index)`` pairs; classes are the sub-folders of ``<root>/<split>`` in
    sorted order (so ``train`` and ``val`` agree). ``split=None`` reads ``root`` itself."""

    def __init__(self, root: str, split: Optional[str] = "train", transform: Optional[Callable] = None):
        folder = root if split is None else os.path.join(root, split)
        layout = f"{folder}/<class>/<image>.jpg"
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found: expected the ImageFolder layout {layout}")
        self.root = folder
        self.classes: List[str] = sorted(
            d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")
        )
        if not self.classes:
            raise DataError(f"no class folders in {folder}: expected the ImageFolder layout {layout}")
        self.class_to_index = {name: i for i, name in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for name in self.classes:
            for path in list_files(os.path.join(folder, name), IMAGE_EXTENSIONS):
                self.samples.append((path, self.class_to_index[name]))
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {folder}")
        self.transform = transform if transform is not None else ClassificationEvalTransform()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = open_image(path)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image), target
