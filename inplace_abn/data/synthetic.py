"""A built-in street-scene dataset in the Cityscapes label space, rendered on the fly: no download,
each sample a function of (seed, split, index), label ids and instance ids like the real thing.

A scene is a street seen from a car: a road between sidewalks (sometimes grass), building facades in
perspective on both sides (or a park), sky, poles with traffic signs, trees, and cars, pedestrians,
parked bicycles and cyclists as instances. Classes overlap in color (grey road, sidewalk, facades,
poles, cars and overcast sky; green trees and grass; anyone can wear any color), so a network has to
use texture, shape and where things are, not color alone. Pixel noise, blur, haze, shadows and color
casts vary per image. Ignored regions (ego vehicle, rectification border, static clutter) appear as
in Cityscapes.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .base import SegmentationDataset
from .labels import IGNORE_INDEX, LABEL_BY_NAME, LABEL_ID_TO_TRAIN_ID, TRAIN_CLASS_NAMES, label_id_palette

_ID = {name: label.id for name, label in LABEL_BY_NAME.items()}
_TO_TRAIN_ID = np.asarray(LABEL_ID_TO_TRAIN_ID, dtype=np.uint8)

#: the evaluated classes a synthetic scene can contain
SYNTHETIC_CLASSES = (
    "road", "sidewalk", "building", "pole", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "bicycle",
)  # fmt: skip

_FACADE_COLORS = np.array(
    [[150, 150, 150], [185, 180, 170], [200, 185, 150], [160, 95, 70], [215, 210, 200], [120, 110, 100],
     [175, 140, 110], [140, 150, 160], [205, 170, 120], [95, 95, 100]],
    dtype=np.float32,
)  # fmt: skip
_CAR_COLORS = np.array(
    [[40, 40, 45], [200, 200, 205], [130, 130, 135], [150, 30, 30], [30, 50, 120], [225, 225, 220],
     [90, 90, 95], [20, 70, 50], [180, 150, 60], [100, 110, 130]],
    dtype=np.float32,
)  # fmt: skip
_SKIN_COLORS = np.array([[230, 190, 160], [200, 150, 110], [150, 100, 70], [95, 60, 40]], dtype=np.float32)


class SyntheticScene(NamedTuple):
    image: np.ndarray  # uint8 (H, W, 3)
    label_ids: np.ndarray  # uint8 (H, W), Cityscapes label ids
    instance_ids: np.ndarray  # int32 (H, W): label_id * 1000 + k for instances, label_id otherwise

    @property
    def train_ids(self) -> np.ndarray:
        return _TO_TRAIN_ID[self.label_ids]


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise in ``[-1, 1]`` with features about ``cell`` pixels wide (bilinear value noise)."""
    grid_h, grid_w = int(height / cell) + 2, int(width / cell) + 2
    values = rng.uniform(-1, 1, size=(grid_h, grid_w)).astype(np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(width, dtype=np.float32) + 0.5) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no grid creases
    top = values[y0][:, x0] * (1 - fx) + values[y0][:, x0 + 1] * fx
    bottom = values[y0 + 1][:, x0] * (1 - fx) + values[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class _Canvas:
    """Color, label id and instance id layers, painted back to front with shapes in pixel units."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng, self.height, self.width = rng, height, width
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.zeros((height, width), dtype=np.uint8)
        self.instance = np.zeros((height, width), dtype=np.int32)
        self.grain = rng.standard_normal((height, width), dtype=np.float32)
        self.mottle = _value_noise(rng, height, width, max(2.0, height / 24))
        self.counts: Dict[int, int] = {}

    def new_instance(self, label_id: int, group: bool = False) -> int:
        if group:
            return label_id
        k = self.counts.get(label_id, 0)
        self.counts[label_id] = k + 1
        return label_id * 1000 + k

    def box(self, x0: float, y0: float, x1: float, y1: float):
        c0, c1 = max(0, int(math.floor(x0))), min(self.width, int(math.ceil(x1)))
        r0, r1 = max(0, int(math.floor(y0))), min(self.height, int(math.ceil(y1)))
        if c0 >= c1 or r0 >= r1:
            return None
        ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
        return (slice(r0, r1), slice(c0, c1)), ys, xs

    def fill(self, region, mask, color, label_id: Optional[int], instance_id: Optional[int] = None,
             grain: float = 6.0, mottle: float = 0.0) -> None:  # fmt: skip
        """Paint ``mask`` (in ``region``); ``color`` is RGB or a per-pixel array; ``label_id=None``
        changes the colors only (shadows, markings on the same surface)."""
        where = np.nonzero(mask)
        if where[0].size == 0:
            return
        color = np.asarray(color, dtype=np.float32)
        shade = self.grain[region][where] * grain
        if mottle:
            shade += self.mottle[region][where] * mottle
        pixels = (color if color.ndim == 1 else color[where]) + shade[:, None]
        self.image[region][where] = pixels
        if label_id is not None:
            self.label[region][where] = label_id
            self.instance[region][where] = label_id if instance_id is None else instance_id

    # shapes: each returns nothing when off-canvas
    def rect(self, x0, y0, x1, y1, color, label_id, instance_id=None, **kw):
        found = self.box(x0, y0, x1, y1)
        if found:
            region, ys, xs = found
            mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
            self.fill(region, mask, color, label_id, instance_id, **kw)

    def ellipse(self, cx, cy, rx, ry, color, label_id, instance_id=None, **kw):
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        found = self.box(cx - rx, cy - ry, cx + rx, cy + ry)
        if found:
            region, ys, xs = found
            mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            self.fill(region, mask, color, label_id, instance_id, **kw)

    def ring(self, cx, cy, radius, thickness, color, label_id, instance_id=None, **kw):
        outer = radius + thickness / 2
        found = self.box(cx - outer, cy - outer, cx + outer, cy + outer)
        if found:
            region, ys, xs = found
            distance = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
            mask = np.abs(distance - radius) <= max(thickness / 2, 0.5)
            self.fill(region, mask, color, label_id, instance_id, **kw)

    def segment(self, xa, ya, xb, yb, thickness, color, label_id, instance_id=None, **kw):
        half = max(thickness / 2, 0.5)
        found = self.box(min(xa, xb) - half, min(ya, yb) - half, max(xa, xb) + half, max(ya, yb) + half)
        if found:
            region, ys, xs = found
            dx, dy = xb - xa, yb - ya
            length2 = max(dx * dx + dy * dy, 1e-6)
            t = np.clip(((xs - xa) * dx + (ys - ya) * dy) / length2, 0, 1)
            mask = (xs - xa - t * dx) ** 2 + (ys - ya - t * dy) ** 2 <= half * half
            self.fill(region, mask, color, label_id, instance_id, **kw)

    def trapezoid(self, x_center, y0, y1, half_top, half_bottom, color, label_id, instance_id=None, **kw):
        half = max(half_top, half_bottom)
        found = self.box(x_center - half, y0, x_center + half, y1)
        if found:
            region, ys, xs = found
            t = (ys - y0) / max(y1 - y0, 1e-6)
            mask = np.abs(xs - x_center) <= half_top + (half_bottom - half_top) * t
            self.fill(region, mask, color, label_id, instance_id, **kw)


def _jitter_color(rng: np.random.Generator, color, amount: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(color, dtype=np.float32) + rng.normal(0, amount, size=3), 0, 255)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    """Clothes and bicycle frames: anything, often dull."""
    if rng.random() < 0.4:
        return np.full(3, rng.uniform(20, 200), dtype=np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    return rng.uniform(20, 235, size=3).astype(np.float32)


class _Street(NamedTuple):
    horizon: float  # row of the horizon
    vanish_x: float  # column of the vanishing point
    focal: float  # pixels; depth Z (in eye heights) of a ground row y is focal / (y - horizon)
    center: float  # lateral offset of the road's center (eye heights; camera at 0)
    road: float  # road half width
    facade_left: float  # lateral coordinate of the facades (< 0 on the left)
    facade_right: float


def _paint_sky(canvas: _Canvas, rng: np.random.Generator, horizon: float) -> None:
    h, w = canvas.height, canvas.width
    ys = (np.arange(h, dtype=np.float32)[:, None, None] + 0.5) / max(horizon, 1.0)
    if rng.random() < 0.35:  # overcast: grey, like concrete and asphalt
        top = np.full(3, rng.uniform(150, 205), dtype=np.float32)
        bottom = top + rng.uniform(5, 25)
    else:
        top = np.array([rng.uniform(60, 120), rng.uniform(120, 170), rng.uniform(190, 245)], dtype=np.float32)
        bottom = np.array([rng.uniform(170, 220), rng.uniform(190, 230), rng.uniform(215, 250)], dtype=np.float32)
    gradient = top + (bottom - top) * np.clip(ys, 0, 1)
    color = np.broadcast_to(gradient, (h, w, 3))
    full = (slice(0, h), slice(0, w))
    canvas.fill(full, np.ones((h, w), dtype=bool), color, _ID["sky"], grain=2.5)
    for _ in range(rng.integers(0, 4)):  # clouds: still sky
        cx, cy = rng.uniform(0, w), rng.uniform(0, horizon * 0.8)
        canvas.ellipse(cx, cy, rng.uniform(0.05, 0.2) * w, rng.uniform(0.03, 0.08) * h,
                       np.full(3, rng.uniform(215, 245)), _ID["sky"], grain=4.0, mottle=10.0)  # fmt: skip


def _paint_ground(canvas: _Canvas, rng: np.random.Generator, street: _Street, sides: Dict[str, dict]) -> None:
    h, w = canvas.height, canvas.width
    r0 = int(math.floor(street.horizon)) + 1
    if r0 >= h:
        return
    region = (slice(r0, h), slice(0, w))
    ys = np.arange(r0, h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    below = np.maximum(ys - street.horizon, 0.5)
    lateral = (xs - street.vanish_x) / below  # eye heights
    depth = np.broadcast_to(street.focal / below, lateral.shape)
    across = lateral - street.center

    paving = [[150, 145, 140], [175, 165, 155], [135, 135, 140], [185, 170, 160]]
    sidewalk_color = _jitter_color(rng, paving[rng.integers(len(paving))])
    canvas.fill(region, np.ones(lateral.shape, bool), sidewalk_color, _ID["sidewalk"], grain=7.0, mottle=10.0)
    tile = rng.uniform(0.6, 1.2)
    joints = (np.abs(((depth / tile) % 1.0) - 0.5) > 0.44) | (np.abs(((lateral / tile) % 1.0) - 0.5) > 0.45)
    canvas.fill(region, joints, sidewalk_color * 0.78, None, grain=5.0)

    for side, sign in (("left", -1.0), ("right", 1.0)):
        spec = sides[side]
        distance = across * sign  # > 0 towards this side's facade
        if spec["grass"] > 0:  # a strip of grass between the curb and the sidewalk
            mask = (distance >= street.road + 0.15) & (distance < street.road + 0.15 + spec["grass"])
            canvas.fill(region, mask, spec["grass_color"], _ID["terrain"], grain=14.0, mottle=22.0)
        if spec["park"]:  # beyond a narrow path, grass up to the park's hedges and trees
            mask = distance >= street.road + 0.15 + spec["grass"] + spec["path"]
            canvas.fill(region, mask, spec["grass_color"], _ID["terrain"], grain=14.0, mottle=22.0)
        curb = (distance >= street.road) & (distance < street.road + 0.15)
        canvas.fill(region, curb, sidewalk_color * 1.12, _ID["sidewalk"], grain=4.0)

    road = np.abs(across) < street.road
    road_color = _jitter_color(rng, np.full(3, rng.uniform(70, 125)), 8.0)
    canvas.fill(region, road, road_color, _ID["road"], grain=9.0, mottle=14.0)
    paint = np.full(3, rng.uniform(185, 235), dtype=np.float32)
    dashes = (np.abs(across) < 0.07) & (((depth / rng.uniform(2.5, 5.0)) % 1.0) < 0.5)
    canvas.fill(region, dashes & road, paint, None, grain=6.0)
    if rng.random() < 0.5:  # edge lines
        edges = road & (np.abs(np.abs(across) - (street.road - 0.2)) < 0.05)
        canvas.fill(region, edges, paint, None, grain=6.0)
    if rng.random() < 0.25:  # a zebra crossing
        start = rng.uniform(3, 12)
        zebra = road & (depth > start) & (depth < start + 2.5) & (((across / 0.5) % 1.0) < 0.5)
        canvas.fill(region, zebra, paint, None, grain=6.0)


def _paint_facades(canvas: _Canvas, rng: np.random.Generator, street: _Street, sides: Dict[str, dict]) -> float:
    """Facades (or a park's hedges and trees) along both sides; returns the depth where the street ends."""
    h, w = canvas.height, canvas.width
    end_depth = rng.uniform(25, 60) if rng.random() < 0.6 else float("inf")
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    full = (slice(0, h), slice(0, w))
    limit = min(end_depth, street.focal / 0.5)  # beyond, a facade is less than half a pixel tall
    for side, facade in (("left", street.facade_left), ("right", street.facade_right)):
        # blocks along the street, drawn at once: building (2), vegetation (1) or a gap (0)
        n = 48
        draw = rng.random(n)
        if sides[side]["park"]:
            kind = np.where(draw < 0.85, 1, 0)
            length, height = rng.uniform(4, 15, n), rng.uniform(1.0, 4.5, n)
        else:
            kind = np.where(draw < 0.85, 2, np.where(draw < 0.94, 0, 1))
            length = np.where(kind == 2, rng.uniform(6, 20, n), rng.uniform(2, 6, n))
            height = np.where(kind == 2, rng.uniform(3.5, 14, n), rng.uniform(2, 5, n))
        facade_color = _FACADE_COLORS[rng.integers(len(_FACADE_COLORS), size=n)] + rng.normal(0, 12, (n, 3))
        leaf_color = np.array([60, 100, 40]) + rng.normal(0, 15, (n, 3))
        color = np.where((kind == 2)[:, None], facade_color, leaf_color).clip(0, 255).astype(np.float32)
        spacing, pane_width = rng.uniform(0.9, 2.0, n), rng.uniform(0.3, 0.6, n)
        floor, pane_height = rng.uniform(1.6, 2.4, n), rng.uniform(0.35, 0.6, n)
        glass = (np.array([50, 60, 75]) + rng.normal(0, 20, (n, 3))).clip(0, 255).astype(np.float32)
        windowed = rng.random(n) < 0.8
        edges = np.concatenate([[0.0], np.cumsum(length)])

        # the facade's contact row offset in each column: its depth there is focal / contact
        contact = (xs - street.vanish_x) / facade
        valid = contact > 0.5
        contact = np.where(valid, contact, 0.5)
        depth = street.focal / contact
        block = np.clip(np.searchsorted(edges[1:], depth, side="right"), 0, n - 1)
        up = (street.horizon + contact - ys) / contact  # height above the ground, eye heights
        top = height[block]
        inside = valid & (depth < limit) & (up >= 0) & (up <= top)
        kind_here = kind[block]
        leafy = inside & (kind_here == 1) & (up <= top - np.abs(canvas.mottle) * 1.5)
        canvas.fill(full, leafy, np.broadcast_to(color[block], (h, w, 3)), _ID["vegetation"],
                    grain=18.0, mottle=30.0)  # fmt: skip
        walls = inside & (kind_here == 2)
        canvas.fill(full, walls, np.broadcast_to(color[block], (h, w, 3)), _ID["building"],
                    grain=6.0, mottle=12.0)  # fmt: skip
        along = (depth - edges[block]) / spacing[block]
        panes = (
            walls
            & windowed[block]
            & ((along % 1.0) < pane_width[block])
            & (((up - 0.3) / floor[block] % 1.0) > 1 - pane_height[block])
            & (up > 1.0)
            & (up < top - 0.4)
        )
        canvas.fill(full, panes, np.broadcast_to(glass[block], (h, w, 3)), None, grain=10.0, mottle=12.0)
    if math.isfinite(end_depth):  # a building across the far end of the street
        contact = street.focal / end_depth
        x0 = street.vanish_x + street.facade_left * contact
        x1 = street.vanish_x + street.facade_right * contact
        top = street.horizon - rng.uniform(3, 10) * contact
        color = _jitter_color(rng, _FACADE_COLORS[rng.integers(len(_FACADE_COLORS))], 12)
        canvas.rect(x0, top, x1, street.horizon + contact, color, _ID["building"], grain=6.0, mottle=12.0)
    return end_depth


class _Thing(NamedTuple):
    depth: float
    kind: str
    lateral: float
    params: dict


def _place_things(rng: np.random.Generator, street: _Street, sides: Dict[str, dict], end_depth: float,
                  density: float) -> List[_Thing]:  # fmt: skip
    """Objects on the ground plane, each at a depth (eye heights) and a lateral position."""
    far = min(end_depth, 30.0)
    things = []

    def depth_sample(near):
        # uniform in 1 / depth: as many objects per image row near and far
        return 1.0 / rng.uniform(1.0 / far, 1.0 / near)

    def count(mean):
        return int(rng.poisson(mean * density))

    for sign, side in ((-1, "left"), (1, "right")):
        spec = sides[side]
        inner = street.center + sign * (street.road + 0.15 + spec["grass"])  # where the sidewalk starts
        outer = street.facade_left if sign < 0 else street.facade_right
        width = abs(outer - inner)
        for _ in range(count(1.6)):
            things.append(_Thing(depth_sample(2.5), "pole", inner + sign * rng.uniform(0.1, 0.35),
                                 {"sign": rng.random() < 0.6}))  # fmt: skip
        for _ in range(count(0.9 if not spec["park"] else 0.4)):
            things.append(_Thing(depth_sample(3.0), "tree", inner + sign * rng.uniform(0.3, 0.5) * width, {}))
        for _ in range(count(2.6)):
            things.append(_Thing(depth_sample(2.5), "person", inner + sign * rng.uniform(0.2, 0.9) * width,
                                 {"facing": rng.choice([-1, 1])}))  # fmt: skip
        for _ in range(count(0.7)):
            things.append(_Thing(depth_sample(2.5), "bicycle", inner + sign * rng.uniform(0.15, 0.6) * width,
                                 {"facing": rng.choice([-1, 1]), "rider": False}))  # fmt: skip
        for _ in range(count(0.6)):  # bins, boxes, benches: "static", ignored in the evaluation
            things.append(_Thing(depth_sample(2.0), "static", inner + sign * rng.uniform(0.3, 0.95) * width, {}))
        for _ in range(count(1.0)):  # parked cars along the curb, seen from the side
            lateral = street.center + sign * (street.road - rng.uniform(0.7, 0.9))
            things.append(_Thing(depth_sample(3.5), "car", lateral, {"side": True}))
    for _ in range(count(2.0)):  # traffic in the lanes, seen from behind
        lane = street.center + rng.choice([-0.5, 0.5]) * street.road * rng.uniform(0.6, 1.1)
        things.append(_Thing(depth_sample(3.5), "car", lane, {"side": False}))
    for _ in range(count(0.8)):  # cyclists near the curb
        lateral = street.center + rng.choice([-1, 1]) * (street.road - rng.uniform(0.4, 0.7))
        things.append(_Thing(depth_sample(2.5), "bicycle", lateral, {"facing": rng.choice([-1, 1]), "rider": True}))
    for _ in range(count(0.4)):  # people crossing
        lateral = street.center + rng.uniform(-1, 1) * street.road
        things.append(_Thing(depth_sample(3.0), "person", lateral, {"facing": rng.choice([-1, 1])}))
    return sorted(things, key=lambda thing: -thing.depth)  # far first: near things occlude them


def _paint_person(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, scale: float,
                  label_id: int, instance: int, facing: int, seated: bool = False) -> None:  # fmt: skip
    """A pedestrian whose feet are at ``(x, y)`` (or, ``seated``, a rider whose hips are there)."""
    height = rng.uniform(1.05, 1.3) * scale
    skin = _SKIN_COLORS[rng.integers(len(_SKIN_COLORS))] + rng.normal(0, 8, 3)
    top, legs = _random_color(rng), _random_color(rng) * 0.7
    paint = {"label_id": label_id, "instance_id": instance}
    if seated:  # torso leaning forward over the handlebar, legs down to the pedals
        hip_x, hip_y = x, y
        lean = facing * 0.18 * height
        shoulder_x, shoulder_y = hip_x + lean, hip_y - 0.33 * height
        canvas.segment(hip_x, hip_y, shoulder_x, shoulder_y, 0.22 * height, top, **paint)
        canvas.segment(shoulder_x, shoulder_y + 0.03 * height, shoulder_x + facing * 0.16 * height,
                       hip_y - 0.1 * height, 0.05 * height, top, **paint)  # fmt: skip
        canvas.segment(hip_x, hip_y, hip_x + facing * 0.12 * height, hip_y + 0.3 * height, 0.11 * height, legs, **paint)
        canvas.ellipse(shoulder_x + facing * 0.03 * height, shoulder_y - 0.08 * height, 0.06 * height,
                       0.075 * height, skin, **paint)  # fmt: skip
        return
    stride = rng.uniform(0.0, 0.14) * height
    hip_y = y - 0.47 * height
    canvas.segment(x, hip_y, x - stride, y, 0.12 * height, legs, **paint)
    canvas.segment(x, hip_y, x + stride, y, 0.12 * height, legs, **paint)
    canvas.trapezoid(x, y - 0.82 * height, hip_y + 0.03 * height, 0.14 * height, 0.12 * height, top, **paint)
    canvas.segment(x, y - 0.8 * height, x + facing * 0.12 * height, y - 0.5 * height, 0.07 * height, top, **paint)
    canvas.ellipse(x, y - 0.9 * height, 0.075 * height, 0.085 * height, skin, **paint)
    if rng.random() < 0.3:  # a bag: part of the person
        canvas.rect(x - facing * 0.15 * height, y - 0.6 * height, x - facing * 0.03 * height, y - 0.42 * height,
                    _random_color(rng), **paint)  # fmt: skip


def _paint_bicycle(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, scale: float,
                   instance: int, facing: int) -> Tuple[float, float]:  # fmt: skip
    """A bicycle seen from the side standing at ``(x, y)``; returns where a rider's hips go."""
    radius = 0.23 * scale
    base = 0.72 * scale
    rear_x, front_x = x - facing * base / 2, x + facing * base / 2
    hub_y = y - radius
    frame = _random_color(rng)
    tire = np.full(3, rng.uniform(15, 50), dtype=np.float32)
    thickness = max(0.09 * scale, 1.0)
    paint = {"label_id": _ID["bicycle"], "instance_id": instance}
    canvas.ring(rear_x, hub_y, radius, thickness, tire, **paint)
    canvas.ring(front_x, hub_y, radius, thickness, tire, **paint)
    crank_x, crank_y = x - facing * 0.05 * scale, hub_y
    seat_x, seat_y = rear_x + facing * 0.18 * scale, hub_y - 0.38 * scale
    head_x, head_y = front_x - facing * 0.08 * scale, hub_y - 0.4 * scale
    for xa, ya, xb, yb in (
        (rear_x, hub_y, crank_x, crank_y),
        (crank_x, crank_y, seat_x, seat_y),
        (seat_x, seat_y, head_x, head_y),
        (crank_x, crank_y, head_x, head_y),
        (rear_x, hub_y, seat_x, seat_y),
        (head_x, head_y, front_x, hub_y),
    ):
        canvas.segment(xa, ya, xb, yb, thickness * 0.8, frame, **paint)
    canvas.segment(head_x, head_y, head_x + facing * 0.06 * scale, head_y - 0.06 * scale, thickness, tire, **paint)
    return seat_x, seat_y


def _paint_car(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, scale: float, instance: int,
               side: bool, ground: Callable) -> None:  # fmt: skip
    body = _jitter_color(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))], 10)
    glass = _jitter_color(rng, [45, 55, 70], 12)
    tire = np.full(3, rng.uniform(15, 40), dtype=np.float32)
    van = rng.random() < 0.2
    height = (1.25 if van else rng.uniform(0.9, 1.05)) * scale
    half = (rng.uniform(1.3, 1.6) if side else rng.uniform(0.55, 0.65)) * scale
    paint = {"label_id": _ID["car"], "instance_id": instance}
    # the shadow under it darkens the ground without changing its label
    ground(x, y, half * 1.05, 0.06 * scale)
    wheel = 0.17 * scale
    sill = y - wheel * 0.9
    roof = y - height
    belt = roof + (0.35 if van else 0.45) * height
    if side:
        canvas.rect(x - half, belt, x + half, sill, body, grain=5.0, **paint)
        cabin_half = half * (0.85 if van else rng.uniform(0.5, 0.65))
        canvas.trapezoid(x, roof, belt + 1, cabin_half * 0.85, cabin_half, body, grain=5.0, **paint)
        canvas.trapezoid(x, roof + 0.08 * height, belt, cabin_half * 0.72, cabin_half * 0.85, glass, **paint)
        canvas.rect(x - 0.03 * scale, roof + 0.05 * height, x + 0.03 * scale, belt, body, **paint)  # pillar
        for wheel_x in (x - half * 0.68, x + half * 0.68):
            canvas.ellipse(wheel_x, y - wheel, wheel, wheel, tire, **paint)
            canvas.ellipse(wheel_x, y - wheel, wheel * 0.45, wheel * 0.45, tire + 80, **paint)
    else:
        canvas.rect(x - half, belt, x + half, y - 0.08 * scale, body, grain=5.0, **paint)
        canvas.trapezoid(x, roof, belt + 1, half * 0.75, half * 0.92, body, grain=5.0, **paint)
        canvas.trapezoid(x, roof + 0.07 * height, belt - 0.02 * height, half * 0.62, half * 0.8, glass, **paint)
        for wheel_x in (x - half * 0.8, x + half * 0.8):
            canvas.rect(wheel_x - 0.1 * scale, y - 0.16 * scale, wheel_x + 0.1 * scale, y, tire, **paint)
        light = np.array([200, 30, 30], dtype=np.float32) + rng.normal(0, 15, 3)
        for sign in (-1, 1):
            lx = x + sign * half * 0.8
            canvas.rect(lx - 0.08 * scale, belt + 0.06 * scale, lx + 0.08 * scale, belt + 0.14 * scale, light, **paint)
        canvas.rect(x - 0.16 * scale, belt + 0.2 * scale, x + 0.16 * scale, belt + 0.28 * scale,
                    np.full(3, 225.0), **paint)  # license plate: part of the car in labelIds  # fmt: skip


def _paint_pole(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, scale: float, has_sign: bool) -> None:
    metal = np.full(3, rng.uniform(80, 170), dtype=np.float32) + rng.normal(0, 6, 3)
    height = rng.uniform(2.4, 3.6) * scale
    half = max(0.07 * scale, 0.5)
    canvas.rect(x - half, y - height, x + half, y, metal, _ID["pole"], grain=4.0)
    if not has_sign:
        return
    size = rng.uniform(0.28, 0.4) * scale
    cx, cy = x, y - height + size
    shape = rng.integers(3)
    sign_id = _ID["traffic sign"]
    if shape == 0:  # round: red rim, white or blue face
        canvas.ellipse(cx, cy, size, size, [200, 30, 35], sign_id, grain=5.0)
        face = [235, 235, 235] if rng.random() < 0.6 else [30, 70, 170]
        canvas.ellipse(cx, cy, size * 0.7, size * 0.7, face, sign_id, grain=5.0)
    elif shape == 1:  # triangle pointing up
        canvas.trapezoid(cx, cy - size, cy + size * 0.8, 0.0, size, [200, 30, 35], sign_id, grain=5.0)
        canvas.trapezoid(cx, cy - size * 0.4, cy + size * 0.55, 0.0, size * 0.6, [240, 240, 235], sign_id, grain=5.0)
    else:  # rectangle: blue or yellow
        face = [30, 80, 180] if rng.random() < 0.5 else [235, 200, 30]
        canvas.rect(cx - size, cy - size * 0.7, cx + size, cy + size * 0.7, face, sign_id, grain=5.0)


def _paint_tree(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, scale: float) -> None:
    veg = _ID["vegetation"]
    trunk_height = rng.uniform(1.2, 2.2) * scale
    canvas.rect(x - 0.06 * scale, y - trunk_height, x + 0.06 * scale, y, _jitter_color(rng, [90, 70, 50], 12),
                veg, grain=8.0)  # fmt: skip
    leaves = _jitter_color(rng, [55, 95, 35], 18)
    radius = rng.uniform(0.7, 1.3) * scale
    for _ in range(rng.integers(3, 6)):
        cx = x + rng.uniform(-0.6, 0.6) * radius
        cy = y - trunk_height - rng.uniform(0.2, 1.0) * radius
        canvas.ellipse(cx, cy, radius * rng.uniform(0.5, 0.9), radius * rng.uniform(0.45, 0.8),
                       leaves * rng.uniform(0.8, 1.15), veg, grain=20.0, mottle=25.0)  # fmt: skip


def render_scene(rng: np.random.Generator, height: int = 96, width: int = 192, density: float = 1.0,
                 noise: float = 1.0) -> SyntheticScene:  # fmt: skip
    """Render one street scene. ``density`` scales the number of objects, ``noise`` the pixel noise,
    blur, haze and color casts (0: a clean image; 1: the default difficulty)."""
    if height < 16 or width < 16:
        raise ValueError(f"synthetic scenes need at least 16x16 pixels, got {height}x{width}")
    canvas = _Canvas(rng, height, width)
    horizon = height * rng.uniform(0.36, 0.5)
    road = rng.uniform(1.3, 2.2)
    center = rng.uniform(-0.5, 0.5)
    sides = {}
    for side in ("left", "right"):
        sides[side] = {
            "grass": rng.uniform(0.3, 0.8) if rng.random() < 0.35 else 0.0,
            "park": rng.random() < 0.2,
            "path": rng.uniform(0.3, 0.8),
            "sidewalk": rng.uniform(1.0, 2.2),
            "grass_color": _jitter_color(rng, [105, 135, 60], 15),
        }
    facade_left = center - road - 0.15 - sides["left"]["grass"] - sides["left"]["sidewalk"]
    facade_right = center + road + 0.15 + sides["right"]["grass"] + sides["right"]["sidewalk"]
    street = _Street(
        horizon=horizon,
        vanish_x=width * rng.uniform(0.38, 0.62),
        focal=width * rng.uniform(0.55, 0.8),
        center=center,
        road=road,
        facade_left=facade_left,
        facade_right=facade_right,
    )

    _paint_sky(canvas, rng, horizon)
    _paint_ground(canvas, rng, street, sides)
    end_depth = _paint_facades(canvas, rng, street, sides)

    def shadow(x, y, half_width, half_height):
        found = canvas.box(x - half_width, y - half_height, x + half_width, y + half_height)
        if found:
            region, ys, xs = found
            mask = ((xs - x) / half_width) ** 2 + ((ys - y) / max(half_height, 0.5)) ** 2 <= 1
            canvas.image[region][mask] *= 0.55

    for thing in _place_things(rng, street, sides, end_depth, density):
        scale = street.focal / thing.depth  # pixels per eye height at that depth
        y = horizon + scale
        x = street.vanish_x + thing.lateral * scale
        if x < -3 * scale or x > width + 3 * scale or scale < 1.0:
            continue
        far = scale < height * 0.06  # a few pixels tall: like Cityscapes' groups, no instance
        if thing.kind == "pole":
            _paint_pole(canvas, rng, x, y, scale, thing.params["sign"])
        elif thing.kind == "tree":
            _paint_tree(canvas, rng, x, y, scale)
        elif thing.kind == "static":
            color = _random_color(rng)
            box_w, box_h = rng.uniform(0.2, 0.6) * scale, rng.uniform(0.3, 0.7) * scale
            canvas.rect(x - box_w, y - box_h, x + box_w, y, color, _ID["static"], grain=5.0)
        elif thing.kind == "person":
            instance = canvas.new_instance(_ID["person"], group=far and rng.random() < 0.5)
            _paint_person(canvas, rng, x, y, scale, _ID["person"], instance, thing.params["facing"])
        elif thing.kind == "bicycle":
            bike = canvas.new_instance(_ID["bicycle"], group=far and rng.random() < 0.5)
            seat = _paint_bicycle(canvas, rng, x, y, scale, bike, thing.params["facing"])
            if thing.params["rider"]:
                rider = canvas.new_instance(_ID["rider"], group=far and rng.random() < 0.5)
                _paint_person(canvas, rng, seat[0], seat[1], scale, _ID["rider"], rider, thing.params["facing"],
                              seated=True)  # fmt: skip
        elif thing.kind == "car":
            instance = canvas.new_instance(_ID["car"], group=far and rng.random() < 0.5)
            _paint_car(canvas, rng, x, y, scale, instance, thing.params["side"], shadow)

    if rng.random() < 0.25:  # the hood of the ego vehicle
        hood = np.full(3, rng.uniform(20, 90), dtype=np.float32)
        canvas.ellipse(width * rng.uniform(0.4, 0.6), height * 1.05, width * 0.7, height * rng.uniform(0.08, 0.14),
                       hood, _ID["ego vehicle"], grain=3.0)  # fmt: skip
    if rng.random() < 0.15:  # a black rectification border
        size = int(rng.integers(1, 4))
        for x0, x1 in ((0, size), (width - size, width)):
            canvas.rect(x0, 0, x1, height, np.zeros(3), _ID["rectification border"], grain=0.0)

    image = canvas.image
    if noise > 0:
        # haze near the horizon, a color cast, blur and sensor noise
        ys = np.arange(height, dtype=np.float32)[:, None, None] + 0.5
        haze = noise * rng.uniform(0.0, 0.45) * np.exp(-np.abs(ys - horizon) / (0.12 * height))
        image = image * (1 - haze) + haze * rng.uniform(170, 230)
        cast = 1 + noise * rng.normal(0, 0.08, size=3).astype(np.float32)
        image = (image - 128) * (1 + noise * rng.uniform(-0.3, 0.2)) + 128 + noise * rng.uniform(-30, 30)
        image = image * cast
        if rng.random() < 0.4 * noise:
            padded = np.pad(image, ((1, 0), (1, 0), (0, 0)), mode="edge")  # a 2x2 box blur
            image = (padded[1:, 1:] + padded[:-1, 1:] + padded[1:, :-1] + padded[:-1, :-1]) / 4
        image += rng.standard_normal(image.shape, dtype=np.float32) * (noise * rng.uniform(3, 10))
    return SyntheticScene(
        image=np.clip(image + 0.5, 0, 255).astype(np.uint8),
        label_ids=canvas.label,
        instance_ids=canvas.instance,
    )


def _stream(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: a function of ``(seed, split, index)`` only, so any worker and any
    order render the same scene."""
    return np.random.default_rng([int(seed), _stream(split), int(index)])


class SyntheticCityscapes(SegmentationDataset):
    """Synthetic street scenes in the Cityscapes label space, rendered on the fly.

    Samples are dicts like :class:`~inplace_abn.data.CityscapesDataset`'s (19 train ids, ignore 255);
    ``eval_maps=True`` adds ``label_ids`` and ``instance_ids`` for the full Cityscapes evaluation.
    Sample ``i`` of ``(seed, split)`` is always the same picture; ``split`` names an independent stream.
    ``cache=True`` keeps rendered scenes in memory (per process): later epochs skip the rendering,
    augmentation still varies.
    """

    class_names = TRAIN_CLASS_NAMES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        num_samples: int = 500,
        height: int = 96,
        width: int = 192,
        seed: int = 0,
        split: str = "train",
        transform: Optional[Callable] = None,
        eval_maps: bool = False,
        density: float = 1.0,
        noise: float = 1.0,
        cache: bool = False,
    ):
        super().__init__(transform, eval_maps)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.height, self.width = num_samples, height, width
        self.seed, self.split, self.density, self.noise = seed, split, density, noise
        self._cache: Optional[Dict[int, SyntheticScene]] = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def name(self, index: int) -> str:
        return synthetic_name(self.split, index)

    def render(self, index: int) -> SyntheticScene:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        scene = render_scene(scene_rng(self.seed, self.split, index), self.height, self.width, self.density, self.noise)
        if self._cache is not None:
            self._cache[index] = scene
        return scene

    def load(self, index: int):
        scene = self.render(index)
        extra = {"label_ids": scene.label_ids, "instance_ids": scene.instance_ids} if self.eval_maps else {}
        return scene.image, scene.train_ids, extra


def synthetic_name(split: str, index: int) -> str:
    """``<city>_<seq>_<frame>`` of a synthetic sample: the city is the split's name, letters only."""
    city = "synth" + "".join(c for c in split.lower() if c.isalpha())
    return f"{city}_{index // 1000:06d}_{index % 1000:06d}"


def coarsen_labels(label_ids: np.ndarray, margin: int = 2) -> np.ndarray:
    """Label ids as a coarse annotation draws them: pixels within ``margin`` of a class boundary become
    ``unlabeled`` (0), as the polygons of Cityscapes' gtCoarse leave the outlines of objects void."""
    padded = np.pad(label_ids, margin, mode="edge")
    height, width = label_ids.shape
    near_boundary = np.zeros(label_ids.shape, dtype=bool)
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            near_boundary |= padded[dy : dy + height, dx : dx + width] != label_ids
    return np.where(near_boundary, 0, label_ids).astype(label_ids.dtype)


def _jobs(splits: Dict[str, int], progress: bool, what: str) -> Sequence:
    jobs = [(split, index) for split, count in splits.items() for index in range(count)]
    if progress:
        try:
            from tqdm import tqdm

            return tqdm(jobs, desc=f"writing synthetic {what}", unit="img")
        except ImportError:
            pass
    return jobs


def write_synthetic_cityscapes(
    root: str,
    splits: Optional[Dict[str, int]] = None,
    height: int = 96,
    width: int = 192,
    seed: int = 0,
    density: float = 1.0,
    noise: float = 1.0,
    progress: bool = False,
) -> Dict[str, List[str]]:
    """Write synthetic scenes in the Cityscapes layout under ``root``::

        leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds,color}.png

    ``splits`` maps split names to sample counts (default ``{"train": 20, "val": 10}``); the images
    are those of ``SyntheticCityscapes(split=..., seed=...)``. A ``train_extra`` split is annotated as
    in Cityscapes, coarsely in ``gtCoarse`` (:func:`coarsen_labels`). Returns the sample names per split.
    """
    from .cityscapes import COARSE_ONLY_SPLITS
    from .io import write_label_png, write_rgb

    splits = {"train": 20, "val": 10} if splits is None else dict(splits)
    palette = np.asarray(label_id_palette(), dtype=np.uint8).reshape(256, 3)
    written: Dict[str, List[str]] = {}
    for split, index in _jobs(splits, progress, "Cityscapes"):
        scene = render_scene(scene_rng(seed, split, index), height, width, density, noise)
        name = synthetic_name(split, index)
        city = name.split("_")[0]
        write_rgb(os.path.join(root, "leftImg8bit", split, city, f"{name}_leftImg8bit.png"), scene.image)
        label_ids, instance_ids, folder = scene.label_ids, scene.instance_ids, "gtFine"
        if split in COARSE_ONLY_SPLITS:
            label_ids, folder = coarsen_labels(label_ids), "gtCoarse"
            instance_ids = np.where(label_ids == 0, 0, instance_ids)
        stem = os.path.join(root, folder, split, city, f"{name}_{folder}_")
        write_label_png(stem + "labelIds.png", label_ids)
        write_label_png(stem + "instanceIds.png", instance_ids, bits=16)
        write_rgb(stem + "color.png", palette[label_ids])
        written.setdefault(split, []).append(name)
    return written


def write_synthetic_kitti(
    root: str,
    train: int = 20,
    test: int = 5,
    height: int = 64,
    width: int = 208,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, List[str]]:
    """Write synthetic scenes in the layout of KITTI's semantics benchmark under ``root``::

        training/image_2/<name>.png, training/semantic/<name>.png (Cityscapes label ids),
        training/semantic_rgb/<name>.png, training/instance/<name>.png (label id * 256 + instance),
        testing/image_2/<name>.png

    with names ``000000_10``, ``000001_10``, ... as KITTI's. Returns the names per folder.
    """
    from .io import write_label_png, write_rgb

    palette = np.asarray(label_id_palette(), dtype=np.uint8).reshape(256, 3)
    written: Dict[str, List[str]] = {}
    for folder, index in _jobs({"training": train, "testing": test}, progress, "KITTI"):
        scene = render_scene(scene_rng(seed, f"kitti_{folder}", index), height, width)
        name = f"{index:06d}_10"
        write_rgb(os.path.join(root, folder, "image_2", name + ".png"), scene.image)
        if folder == "training":
            ids = scene.instance_ids.astype(np.int64)
            number = np.where(ids >= 1000, ids % 1000 + 1, 0)  # KITTI numbers instances from 1
            kitti_instance = scene.label_ids.astype(np.int64) * 256 + number
            write_label_png(os.path.join(root, folder, "semantic", name + ".png"), scene.label_ids)
            write_rgb(os.path.join(root, folder, "semantic_rgb", name + ".png"), palette[scene.label_ids])
            write_label_png(os.path.join(root, folder, "instance", name + ".png"), kitti_instance, bits=16)
        written.setdefault(folder, []).append(name)
    return written
