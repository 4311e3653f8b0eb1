"""Augmentation and tensor conversion for segmentation (image and label kept aligned) and
classification (random resized crop, center crop, ten crops).

Images are ``uint8`` arrays ``(H, W, 3)`` (or PIL images for classification), labels integer arrays
``(H, W)``. Random draws come from torch's generator (the global one unless one is given), so
DataLoader workers get distinct, reproducible streams and a resumed run repeats its augmentation.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """An integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _pil_filter(name: str):
    from PIL import Image

    filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    if name not in filters:
        raise ValueError(f"interpolation must be one of {sorted(filters)}, got {name!r}")
    return filters[name]


# --------------------------------------------------------------------------------------------
# Geometry on (image, label) pairs


def resize_image(image: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), _pil_filter(interpolation))
    return np.asarray(resized)


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize: a label is never blended with its neighbours."""
    from PIL import Image

    if label.shape == (height, width):
        return label
    if label.dtype == np.uint8:
        source = Image.fromarray(label)
    else:
        source = Image.fromarray(label.astype(np.int32))  # 32-bit mode "I" keeps any id
    resized = np.asarray(source.resize((width, height), Image.NEAREST))
    return resized.astype(label.dtype, copy=False)


def random_scale(
    image: np.ndarray,
    label: np.ndarray,
    scale_range: Tuple[float, float],
    interpolation: str = "bilinear",
    generator: Optional[torch.Generator] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    scale = _uniform(scale_range[0], scale_range[1], generator)
    height = max(1, int(round(image.shape[0] * scale)))
    width = max(1, int(round(image.shape[1] * scale)))
    return resize_image(image, height, width, interpolation), resize_label(label, height, width)


def pad_to(
    image: np.ndarray, label: np.ndarray, height: int, width: int, fill: Sequence[int], ignore_index: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Pad at the bottom and right up to at least ``(height, width)``; padding is ignored in the loss."""
    pad_h, pad_w = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if pad_h == 0 and pad_w == 0:
        return image, label
    padded_image = np.empty((image.shape[0] + pad_h, image.shape[1] + pad_w, 3), dtype=image.dtype)
    padded_image[...] = np.asarray(fill, dtype=image.dtype)
    padded_image[: image.shape[0], : image.shape[1]] = image
    padded_label = np.full(padded_image.shape[:2], ignore_index, dtype=label.dtype)
    padded_label[: label.shape[0], : label.shape[1]] = label
    return padded_image, padded_label


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    size: Size,
    fill: Sequence[int] = (0, 0, 0),
    ignore_index: int = IGNORE_INDEX,
    generator: Optional[torch.Generator] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    crop_h, crop_w = _pair(size)
    image, label = pad_to(image, label, crop_h, crop_w, fill, ignore_index)
    top = _randint(0, image.shape[0] - crop_h, generator)
    left = _randint(0, image.shape[1] - crop_w, generator)
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    return image[window], label[window]


def random_hflip(
    image: np.ndarray, label: np.ndarray, p: float = 0.5, generator: Optional[torch.Generator] = None
) -> Tuple[np.ndarray, np.ndarray]:
    if p > 0 and float(torch.rand((), generator=generator)) < p:
        return image[:, ::-1], label[:, ::-1]
    return image, label


# --------------------------------------------------------------------------------------------
# Photometry

# RGB -> YIQ; a hue shift is a rotation of the (I, Q) plane
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


class ColorJitter:
    """Random brightness, contrast, saturation (factors in ``1 +- value``) and hue (a rotation of
    ``+- hue`` turns), applied in that order on a ``uint8`` RGB image."""

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.02):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image: np.ndarray, generator: Optional[torch.Generator] = None) -> np.ndarray:
        # all four draws happen whatever the settings, so the random stream doesn't depend on them
        draws = torch.rand(4, generator=generator).tolist()
        b = 1 + self.brightness * (2 * draws[0] - 1)
        c = 1 + self.contrast * (2 * draws[1] - 1)
        s = 1 + self.saturation * (2 * draws[2] - 1)
        h = self.hue * (2 * draws[3] - 1) * 2 * math.pi

        x = image.astype(np.float32) * b
        gray = x @ _RGB_TO_YIQ[0]
        x = (x - gray.mean()) * c + gray.mean()
        gray = (x @ _RGB_TO_YIQ[0])[..., None]
        x = gray + (x - gray) * s
        if h != 0.0:
            cos, sin = math.cos(h), math.sin(h)
            rotation = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], dtype=np.float32)
            x = x @ (_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ).T
        return np.clip(x + 0.5, 0, 255).astype(np.uint8)

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue})"
        )


# --------------------------------------------------------------------------------------------
# Tensors


def image_to_tensor(image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``uint8 (H, W, 3)`` (or a PIL image) -> normalised ``float32 (3, H, W)``."""
    array = np.asarray(image, dtype=np.uint8)
    if not (array.flags.writeable and array.flags.c_contiguous):  # torch wants its own writable memory
        array = np.array(array, order="C")
    tensor = torch.from_numpy(array).permute(2, 0, 1).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def tensor_to_image(
    tensor: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Undo :func:`image_to_tensor`: normalised ``(3, H, W)`` -> ``uint8 (H, W, 3)``, for display."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    image = (tensor.detach().float().cpu() * std_t + mean_t).clamp_(0, 1).mul_(255).round_()
    return image.to(torch.uint8).permute(1, 2, 0).numpy()


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Segmentation pipelines: callables (image, label) -> (image tensor, label tensor)


class SegmentationTrainTransform:
    """Random scale, crop (padding with ignored pixels when the scaled image is smaller), horizontal
    flip and color jitter; then normalisation. The label follows every geometric step, resized with
    nearest neighbour."""

    def __init__(
        self,
        crop_size: Size,
        scale_range: Tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        jitter: Optional[ColorJitter] = ColorJitter(),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = IGNORE_INDEX,
        interpolation: str = "bilinear",
        generator: Optional[torch.Generator] = None,
    ):
        self.crop_size = _pair(crop_size)
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.jitter = jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.interpolation = interpolation
        _pil_filter(interpolation)
        self.generator = generator
        self.fill = tuple(int(round(255 * m)) for m in self.mean)  # pads to 0 after normalisation

    def augment(self, image: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The random steps alone, on arrays: ``uint8 (h, w, 3)`` and ``(h, w)`` of the crop size."""
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} differ in size")
        g = self.generator
        if self.scale_range != (1.0, 1.0):
            image, label = random_scale(image, label, self.scale_range, self.interpolation, g)
        image, label = random_crop(image, label, self.crop_size, self.fill, self.ignore_index, g)
        image, label = random_hflip(image, label, self.hflip, g)
        if self.jitter is not None:
            image = self.jitter(image, g)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.augment(image, label)
        return image_to_tensor(image, self.mean, self.std), label_to_tensor(label)


class SegmentationEvalTransform:
    """Normalisation, optionally after a fixed rescale (the label then follows with nearest)."""

    def __init__(
        self,
        scale: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ):
        self.scale = scale
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        _pil_filter(interpolation)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray]):
        if self.scale != 1.0:
            height = max(1, int(round(image.shape[0] * self.scale)))
            width = max(1, int(round(image.shape[1] * self.scale)))
            image = resize_image(image, height, width, self.interpolation)
            label = None if label is None else resize_label(label, height, width)
        image_tensor = image_to_tensor(image, self.mean, self.std)
        return image_tensor, (None if label is None else label_to_tensor(label))


# --------------------------------------------------------------------------------------------
# Classification pipelines: callables PIL image -> tensor


def _to_pil(image):
    from PIL import Image

    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image.convert("RGB") if image.mode != "RGB" else image


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
) -> Tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a crop covering a random fraction ``scale`` of the area with a
    random aspect ratio (log-uniform in ``ratio``); falls back to a center crop after 10 tries."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(0, height - h, generator)
            left = _randint(0, width - w, generator)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ClassificationTrainTransform:
    """Random resized crop to ``size``, horizontal flip, optional color jitter, normalisation."""

    def __init__(
        self,
        size: int = 224,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        jitter: Optional[ColorJitter] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        generator: Optional[torch.Generator] = None,
    ):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip, self.jitter = hflip, jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.generator = generator

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = _to_pil(image)
        box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, self.generator)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        array = np.asarray(image)
        if self.hflip > 0 and float(torch.rand((), generator=self.generator)) < self.hflip:
            array = array[:, ::-1]
        if self.jitter is not None:
            array = self.jitter(array, self.generator)
        return image_to_tensor(array, self.mean, self.std)


class ClassificationEvalTransform:
    """Resize the shorter side to ``resize``, then the center ``size`` crop (``(3, S, S)``), or with
    ``ten_crop`` the four corners and the center, each also flipped (``(10, 3, S, S)``)."""

    def __init__(
        self,
        size: int = 224,
        resize: int = 256,
        ten_crop: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if resize < size:
            raise ValueError(f"resize ({resize}) must be at least the crop size ({size})")
        self.size, self.resize, self.ten_crop = size, resize, ten_crop
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = _to_pil(image)
        short = min(image.width, image.height)
        width = max(self.size, int(round(image.width * self.resize / short)))
        height = max(self.size, int(round(image.height * self.resize / short)))
        array = np.asarray(image.resize((width, height), Image.BILINEAR))
        s = self.size
        top, left = (height - s) // 2, (width - s) // 2
        center = array[top : top + s, left : left + s]
        if not self.ten_crop:
            return image_to_tensor(center, self.mean, self.std)
        crops = [
            array[:s, :s],
            array[:s, width - s :],
            array[height - s :, :s],
            array[height - s :, width - s :],
            center,
        ]
        crops += [crop[:, ::-1] for crop in crops]
        return torch.stack([image_to_tensor(crop, self.mean, self.std) for crop in crops])


# --------------------------------------------------------------------------------------------
# Lighting noise on normalised tensors

# the principal components of ImageNet's RGB pixels in [0, 1] (AlexNet's "fancy PCA" augmentation)
_PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
_PCA_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class Lighting:
    """AlexNet's lighting noise: adds ``eigenvectors @ (alpha * eigenvalues)`` to every pixel (RGB in
    [0, 1]), ``alpha ~ N(0, alpha_std)`` per image. Applied to a tensor normalised with ``std``, the
    shift is divided by it, which is the same as adding it before the normalisation."""

    def __init__(self, alpha_std: float = 0.1, std: Sequence[float] = IMAGENET_STD):
        self.alpha_std = alpha_std
        self.std = tuple(std)

    def shift(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The RGB shift of one image, in [0, 1] units."""
        alpha = torch.randn(3, generator=generator) * self.alpha_std
        vectors = torch.tensor(_PCA_EIGENVECTORS, dtype=torch.float32)
        return vectors @ (alpha * torch.tensor(_PCA_EIGENVALUES, dtype=torch.float32))

    def __call__(self, tensor: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.alpha_std == 0:
            return tensor
        shift = self.shift(generator) / torch.tensor(self.std, dtype=torch.float32)
        return tensor + shift.view(3, 1, 1).to(tensor.dtype)

    def __repr__(self) -> str:
        return f"Lighting(alpha_std={self.alpha_std})"
