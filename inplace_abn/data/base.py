"""What every segmentation dataset here shares: the sample format and the transform hook."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .transforms import SegmentationEvalTransform


class SegmentationDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``dict`` samples:

    - ``image``: ``float32 (3, H, W)``, normalised (whatever ``transform`` returns);
    - ``label``: ``int64 (H, W)`` train ids, ``ignore_index`` where not evaluated;
    - ``name``: the sample's name (for Cityscapes ``<city>_<seq>_<frame>``);
    - ``size``: ``int64 (2,)``, the image's (height, width) before the transform (predictions of
      resized images go back to it);
    - with ``eval_maps=True``, untransformed ``label_ids`` and ``instance_ids`` (``int64 (H0, W0)``) at
      the original resolution, for the Cityscapes evaluation (datasets that have them).

    ``transform(image uint8 (H, W, 3), label (H, W)) -> (image tensor, label tensor)``; the default only
    normalises. Subclasses implement :meth:`__len__`, :meth:`name`, and :meth:`load_image` with
    :meth:`load_labels` (or :meth:`load`).
    """

    #: class names in train id order
    class_names: Tuple[str, ...] = ()
    ignore_index: int = 255

    def __init__(self, transform: Optional[Callable] = None, eval_maps: bool = False):
        self.transform = transform if transform is not None else SegmentationEvalTransform()
        self.eval_maps = eval_maps

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def name(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, np.ndarray]]:
        """``(image uint8 (H, W, 3), train-id label (H, W) or None, extra maps)`` of one sample."""
        image = self.load_image(index)
        label, extra = self.load_labels(index, image.shape[:2])
        return image, label, extra

    # Datasets read from files implement these two (a generated one may override load instead), so that
    # a check can read a sample's labels even when its image is broken.
    def load_image(self, index: int) -> np.ndarray:
        """The image of one sample, ``uint8 (H, W, 3)``."""
        raise NotImplementedError

    def load_labels(
        self, index: int, image_size: Optional[Tuple[int, int]]
    ) -> Tuple[Optional[np.ndarray], Dict[str, np.ndarray]]:
        """``(train-id label (H, W) or None, extra maps)``, each checked to be ``image_size`` (``None``:
        unknown, not checked)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(self)} samples")
        index = index % len(self)
        image, label, extra = self.load(index)
        image_tensor, label_tensor = self.transform(image, label)
        sample = {"image": image_tensor, "name": self.name(index), "size": torch.tensor(image.shape[:2])}
        if label_tensor is not None:
            sample["label"] = label_tensor
        if self.eval_maps:
            for key, value in extra.items():
                sample[key] = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64))
        return sample

    def orphan_labels(self) -> List[Tuple[str, str]]:
        """``(label file, its missing image)`` for every label file that no image of the dataset has."""
        return []
