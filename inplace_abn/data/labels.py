"""The Cityscapes label space: label ids as stored in ``*_labelIds.png``, the 19 train ids a network
predicts, categories and colors. Pure Python, so the command line can use it without numpy.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

#: train id (and Vistas class) of pixels that take no part in the loss or the metrics
IGNORE_INDEX = 255


class CityscapesLabel(NamedTuple):
    name: str
    id: int  # value in *_gtFine_labelIds.png (-1: license plate, never stored in label maps)
    train_id: int  # 0..18 for the evaluated classes, IGNORE_INDEX otherwise
    category: str
    category_id: int
    has_instances: bool  # instance classes carry labelId * 1000 + k in *_instanceIds.png
    ignore_in_eval: bool
    color: Tuple[int, int, int]


def _table() -> List[CityscapesLabel]:
    # name, id, category, category id, instances, train id (None: ignored in training and
    # evaluation), RGB color of the official visualisation
    rows = [
        ("unlabeled", 0, "void", 0, False, None, (0, 0, 0)),
        ("ego vehicle", 1, "void", 0, False, None, (0, 0, 0)),
        ("rectification border", 2, "void", 0, False, None, (0, 0, 0)),
        ("out of roi", 3, "void", 0, False, None, (0, 0, 0)),
        ("static", 4, "void", 0, False, None, (0, 0, 0)),
        ("dynamic", 5, "void", 0, False, None, (111, 74, 0)),
        ("ground", 6, "void", 0, False, None, (81, 0, 81)),
        ("road", 7, "flat", 1, False, 0, (128, 64, 128)),
        ("sidewalk", 8, "flat", 1, False, 1, (244, 35, 232)),
        ("parking", 9, "flat", 1, False, None, (250, 170, 160)),
        ("rail track", 10, "flat", 1, False, None, (230, 150, 140)),
        ("building", 11, "construction", 2, False, 2, (70, 70, 70)),
        ("wall", 12, "construction", 2, False, 3, (102, 102, 156)),
        ("fence", 13, "construction", 2, False, 4, (190, 153, 153)),
        ("guard rail", 14, "construction", 2, False, None, (180, 165, 180)),
        ("bridge", 15, "construction", 2, False, None, (150, 100, 100)),
        ("tunnel", 16, "construction", 2, False, None, (150, 120, 90)),
        ("pole", 17, "object", 3, False, 5, (153, 153, 153)),
        ("polegroup", 18, "object", 3, False, None, (153, 153, 153)),
        ("traffic light", 19, "object", 3, False, 6, (250, 170, 30)),
        ("traffic sign", 20, "object", 3, False, 7, (220, 220, 0)),
        ("vegetation", 21, "nature", 4, False, 8, (107, 142, 35)),
        ("terrain", 22, "nature", 4, False, 9, (152, 251, 152)),
        ("sky", 23, "sky", 5, False, 10, (70, 130, 180)),
        ("person", 24, "human", 6, True, 11, (220, 20, 60)),
        ("rider", 25, "human", 6, True, 12, (255, 0, 0)),
        ("car", 26, "vehicle", 7, True, 13, (0, 0, 142)),
        ("truck", 27, "vehicle", 7, True, 14, (0, 0, 70)),
        ("bus", 28, "vehicle", 7, True, 15, (0, 60, 100)),
        ("caravan", 29, "vehicle", 7, True, None, (0, 0, 90)),
        ("trailer", 30, "vehicle", 7, True, None, (0, 0, 110)),
        ("train", 31, "vehicle", 7, True, 16, (0, 80, 100)),
        ("motorcycle", 32, "vehicle", 7, True, 17, (0, 0, 230)),
        ("bicycle", 33, "vehicle", 7, True, 18, (119, 11, 32)),
        ("license plate", -1, "vehicle", 7, False, None, (0, 0, 142)),
    ]
    table = []
    for name, label_id, category, category_id, instances, train_id, color in rows:
        ignored = train_id is None
        table.append(
            CityscapesLabel(
                name=name,
                id=label_id,
                train_id=IGNORE_INDEX if ignored else train_id,
                category=category,
                category_id=category_id,
                has_instances=instances,
                ignore_in_eval=ignored,
                color=color,
            )
        )
    return table


#: every Cityscapes label, in label id order (license plate, id -1, last)
LABELS: Tuple[CityscapesLabel, ...] = tuple(_table())

#: label ids that may appear in a ``*_labelIds.png`` file: 0..33
MAX_LABEL_ID = max(label.id for label in LABELS)
NUM_LABEL_IDS = MAX_LABEL_ID + 1

LABEL_BY_ID: Dict[int, CityscapesLabel] = {label.id: label for label in LABELS}
LABEL_BY_NAME: Dict[str, CityscapesLabel] = {label.name: label for label in LABELS}

#: the 19 evaluated classes, in train id order
TRAIN_LABELS: Tuple[CityscapesLabel, ...] = tuple(
    sorted((label for label in LABELS if not label.ignore_in_eval), key=lambda label: label.train_id)
)
NUM_TRAIN_CLASSES = len(TRAIN_LABELS)
TRAIN_CLASS_NAMES: Tuple[str, ...] = tuple(label.name for label in TRAIN_LABELS)

#: label id -> train id, for every value a uint8 label map can hold (invalid ids -> IGNORE_INDEX)
LABEL_ID_TO_TRAIN_ID: Tuple[int, ...] = tuple(
    LABEL_BY_ID[i].train_id if 0 <= i <= MAX_LABEL_ID else IGNORE_INDEX for i in range(256)
)
#: train id -> label id (what prediction files store)
TRAIN_ID_TO_LABEL_ID: Tuple[int, ...] = tuple(label.id for label in TRAIN_LABELS)

#: categories in order of first appearance in the table, and their labels (license plate included)
CATEGORIES: Tuple[str, ...] = tuple(dict.fromkeys(label.category for label in LABELS))
LABELS_BY_CATEGORY: Dict[str, Tuple[CityscapesLabel, ...]] = {
    category: tuple(label for label in LABELS if label.category == category) for category in CATEGORIES
}

#: the 8 evaluated classes with instances (iIoU is defined for them)
INSTANCE_CLASS_NAMES: Tuple[str, ...] = tuple(
    label.name for label in TRAIN_LABELS if label.has_instances
)


def train_id_palette() -> List[int]:
    """A 768-entry palette (PIL ``putpalette``) coloring train ids; ignored pixels black."""
    palette = [0] * 768
    for label in TRAIN_LABELS:
        palette[3 * label.train_id : 3 * label.train_id + 3] = label.color
    return palette


def label_id_palette() -> List[int]:
    """A 768-entry palette coloring label ids as the official ``*_gtFine_color.png`` does."""
    palette = [0] * 768
    for label in LABELS:
        if label.id >= 0:
            palette[3 * label.id : 3 * label.id + 3] = label.color
    return palette
