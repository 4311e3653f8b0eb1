"""Reading a whole dataset tree before a long run, with the readers training uses: every image and
label decoded, pairs matched, label ids checked, and every problem listed rather than the first."""

from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .errors import KINDS, DataError

CHECKED_DATASETS = ("cityscapes", "vistas", "kitti")


class Problem(NamedTuple):
    kind: str  # one of errors.KINDS
    path: Optional[str]
    message: str


class CheckReport(NamedTuple):
    dataset: str
    root: str
    splits: Dict[str, Dict[str, Any]]  # split -> {"samples": n, "labels": annotation or None}
    problems: List[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def samples(self) -> int:
        return sum(split["samples"] for split in self.splits.values())

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind] = counts.get(problem.kind, 0) + 1
        return counts

    def to_dict(self) -> Dict[str, Any]:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "ok": self.ok,
            "samples": self.samples,
            "splits": self.splits,
            "counts": self.counts(),
            "problems": [problem._asdict() for problem in self.problems],
        }


def _problem(error: DataError) -> Problem:
    return Problem(error.kind, error.path, str(error))


def _default_splits(dataset: str, root: str) -> List[str]:
    """Every split the tree holds; when it holds none, the usual first one, whose building says what is missing."""
    if dataset == "cityscapes":
        folder = os.path.join(root, "leftImg8bit")
    elif dataset == "vistas":
        folder = root
    else:
        return [split for split, sub in (("trainval", "training"), ("test", "testing"))
                if os.path.isdir(os.path.join(root, sub))] or ["trainval"]  # fmt: skip
    if not os.path.isdir(folder):
        return ["train" if dataset == "cityscapes" else "training"]
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if dataset == "vistas":
        names = [d for d in names if os.path.isdir(os.path.join(folder, d, "images"))]
    return names or ["train" if dataset == "cityscapes" else "training"]


def build_split(dataset: str, root: str, split: str):
    """``(dataset of one split as the check reads it, what labels it has)``: labels where the split has
    them, instance maps included, missing files left to be reported sample by sample."""
    if dataset == "cityscapes":
        from .cityscapes import CityscapesDataset

        # the test split's labels are placeholders, often not unpacked: images only when absent
        annotation = None if split == "test" and not os.path.isdir(os.path.join(root, "gtFine", "test")) else "auto"
        built = CityscapesDataset(root, split, annotation, eval_maps=True, require_labels=False)
        return built, "+".join(sorted({f.annotation for f in built.files if f.annotation is not None})) or None
    if dataset == "vistas":
        from .vistas import VistasDataset

        labels = split != "testing" or os.path.isdir(os.path.join(root, split, "labels"))
        return VistasDataset(root, split, labels=labels, require_labels=False), "labels" if labels else None
    if dataset == "kitti":
        from .kitti import KittiDataset

        labels = split != "test"
        return KittiDataset(root, split, eval_maps=labels, require_labels=False), "labels" if labels else None
    raise ValueError(f"check covers {', '.join(CHECKED_DATASETS)}; got {dataset!r}")


def check_sample(dataset, index: int) -> List[Problem]:
    """Every problem of one sample: its image, and its labels even when the image is broken."""
    problems, image_size = [], None
    try:
        image_size = dataset.load_image(index).shape[:2]
    except DataError as error:
        problems.append(_problem(error))
    try:
        dataset.load_labels(index, image_size)
    except DataError as error:
        problems.append(_problem(error))
    return problems


class _AllSamples(torch.utils.data.Dataset):
    """The samples of several datasets as one, each item the problems of one sample."""

    def __init__(self, datasets: Sequence):
        self.index = [(dataset, i) for dataset in datasets for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> List[Tuple[str, Optional[str], str]]:
        dataset, index = self.index[position]
        return [tuple(problem) for problem in check_sample(dataset, index)]


def _as_is(item):
    return item


def check_tree(dataset: str, root: str, splits: Optional[Sequence[str]] = None, workers: int = 0,
               progress: bool = True) -> CheckReport:  # fmt: skip
    """Read every sample of ``splits`` (default: all the tree holds) of a ``dataset`` tree at ``root``.
    ``workers`` processes read in parallel."""
    if dataset not in CHECKED_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(CHECKED_DATASETS)}, got {dataset!r}")
    problems: List[Problem] = []
    split_info: Dict[str, Dict[str, Any]] = {}
    datasets = []
    for split in splits or _default_splits(dataset, root):
        try:
            split_dataset, labels = build_split(dataset, root, split)
        except DataError as error:  # a folder missing from the layout: nothing of this split to read
            if _problem(error) not in problems:  # e.g. Vistas' class list, shared by every split
                problems.append(_problem(error))
            continue
        split_info[split] = {"samples": len(split_dataset), "labels": labels}
        for label, image in split_dataset.orphan_labels():
            problems.append(Problem("missing", image, f"no image for {label}: expected {image}"))
        datasets.append(split_dataset)

    samples = _AllSamples(datasets)
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=workers, collate_fn=_as_is)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(samples), desc=f"checking {dataset}", unit="sample", dynamic_ncols=True)
    for found in loader:
        problems.extend(Problem(*problem) for problem in found)
    return CheckReport(dataset, root, split_info, problems)


def describe(report: CheckReport) -> str:
    """The report as the command line prints it: one line per problem, then the summary."""
    splits = ", ".join(f"{name} {info['samples']}" + (f" ({info['labels']})" if info["labels"] else " (images only)")
                       for name, info in report.splits.items())  # fmt: skip
    lines = [f"[{problem.kind}] {problem.message}" for problem in report.problems]
    lines.append(f"{report.dataset} at {report.root}: {report.samples} samples read ({splits or 'no split found'})")
    if report.ok:
        lines.append("no problems found")
    else:
        counts = report.counts()
        lines.append(f"{len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}:")
        lines += [f"  {counts[kind]:6d} x {KINDS[kind]}" for kind in KINDS if kind in counts]
    return "\n".join(lines)
