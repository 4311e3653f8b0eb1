"""Where a run reports: a CSV of the logged steps and one of the validations (appended on resume),
TensorBoard when installed and asked for, and a PNG of the curves at the end."""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence

COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "memory_mib", "elapsed_s")
VAL_COLUMNS = ("step", "metric", "value", "best_value")


class CsvLog:
    """Rows of ``columns``; a resumed run drops the rows past its checkpoint's step, then appends."""

    def __init__(self, path: str, resume_step: Optional[int] = None, columns: Sequence[str] = COLUMNS):
        self.path, self.columns = path, tuple(columns)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rows = read_csv_log(path) if resume_step is not None and os.path.isfile(path) else []
        rows = [row for row in rows if row["step"] <= (resume_step or 0)]
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, self.columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _format(row.get(key)) for key in self.columns})

    def write(self, row: Dict[str, float]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, self.columns).writerow({key: _format(row.get(key)) for key in self.columns})


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv_log(path: str) -> List[Dict[str, float]]:
    """The rows of a CSV log: ``step`` as int, numbers as float, other text as it is."""

    def parse(key, value):
        if key == "step":
            return int(float(value))
        try:
            return float(value)
        except ValueError:
            return value

    with open(path, newline="", encoding="utf-8") as file:
        return [{key: parse(key, value) for key, value in row.items() if value} for row in csv.DictReader(file)]


class TensorBoardLog:
    """Scalars to TensorBoard, if ``torch.utils.tensorboard`` can be imported; silently nothing otherwise."""

    def __init__(self, directory: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            print("tensorboard not installed: logging to CSV only")
        else:
            self.writer = SummaryWriter(directory)

    def write(self, row: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for key in ("loss", "lr", "images_per_s", "memory_mib"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def write_scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(csv_path: str, png_path: str, title: str = "") -> Optional[str]:
    """Loss, learning rate and throughput against the step; ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_csv_log(csv_path)
    if not rows:
        return None
    steps = [row["step"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key, label in zip(axes, ("loss", "lr", "images_per_s"), ("training loss", "learning rate",
                                                                       "images / s")):  # fmt: skip
        axis.plot(steps, [row.get(key, float("nan")) for row in rows])
        axis.set_xlabel("step")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
