"""Tiny dataset trees in the real layouts (Vistas with a 66-label config.json, ImageFolder), drawn from
the synthetic street scenes, for the tests of the training recipes and of evaluation."""

import json
import os

import numpy as np
from PIL import Image

from inplace_abn.data.synthetic import render_scene, scene_rng

#: Vistas v1.1 has 66 labels, the last ("unlabeled") not evaluated: 65 classes
VISTAS_LABELS = 66


def vistas_labels():
    rng = np.random.default_rng(7)
    labels = []
    for index in range(VISTAS_LABELS):
        last = index == VISTAS_LABELS - 1
        labels.append({
            "name": "void--unlabeled" if last else f"class--{index}",
            "readable": "Unlabeled" if last else f"Class {index}",
            "color": [int(c) for c in rng.integers(0, 256, 3)],
            "instances": False,
            "evaluate": not last,
        })  # fmt: skip
    return labels


def write_vistas_tree(root, splits=None, height=32, width=48, seed=0):
    """``<root>/config.json`` and ``<root>/<split>/{images,labels}``: scenes whose Cityscapes train ids
    ``t`` become Vistas class ``3 t`` (ignored pixels: the unlabeled class 65). Returns the labels."""
    splits = {"training": 4, "validation": 2} if splits is None else splits
    labels = vistas_labels()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as file:
        json.dump({"labels": labels, "version": "1.1"}, file)
    palette = [c for entry in labels for c in entry["color"]] + [0] * (768 - 3 * len(labels))
    table = np.full(256, VISTAS_LABELS - 1, dtype=np.uint8)
    table[:19] = 3 * np.arange(19)
    for split, count in splits.items():
        for folder in ("images", "labels"):
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for index in range(count):
            scene = render_scene(scene_rng(seed, split, index), height, width)
            Image.fromarray(scene.image).save(os.path.join(root, split, "images", f"{split}{index}.png"))
            label = Image.fromarray(table[scene.train_ids])
            label.putpalette(palette)  # Vistas labels are palette PNGs whose indices are class ids
            label.save(os.path.join(root, split, "labels", f"{split}{index}.png"))
    return labels


def write_imagefolder_tree(root, classes=3, per_class=2, size=40, splits=("train", "val")):
    """``<root>/<split>/<class>/<image>.png`` of random images."""
    rng = np.random.default_rng(1)
    for split in splits:
        for class_index in range(classes):
            folder = os.path.join(root, split, f"n{class_index:08d}")
            os.makedirs(folder, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{split}_{index}.png"))
