"""Splitting the usable images into train, validation and test: folders where given, else a seeded stratified split.

Every class is split on its own, after sorting, with a shuffle seeded by (seed, class name): the
result depends on neither listing order nor the other classes, and small classes still get a
validation and a test image. A split or class left without usable images is a DataError naming it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from trainer.config import PrepareConfig
from trainer.data.manifest import SPLITS
from trainer.data.prepare.images import ImageCheck
from trainer.data.prepare.source import SourceFile, SourceLayout
from trainer.errors import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A usable image on its way into a shard."""

    file: SourceFile
    check: ImageCheck
    label: int


def split_sizes(count: int, validation_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) images for a class of ``count`` images; at least one stays in train.

    A class with >= 2 images gives validation at least one (when asked for), a class
    with >= 3 gives test at least one, so small classes are still evaluated.
    """
    test = 0
    if test_fraction > 0 and count >= 3:
        test = min(max(1, _round_half_up(count * test_fraction)), count - 2 if validation_fraction > 0 else count - 1)
    validation = 0
    if validation_fraction > 0 and count >= 2:
        validation = min(max(1, _round_half_up(count * validation_fraction)), count - 1 - test)
    return validation, test


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def stratified_split(
    items_by_class: dict[str, Sequence[T]],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    key: Callable[[T], str] = str,
) -> dict[str, dict[str, list[T]]]:
    """Split every class separately: split -> class -> items.

    Items are sorted by ``key`` before a shuffle seeded by (seed, class name), so the
    result depends on neither listing order nor the other classes.
    """
    result: dict[str, dict[str, list[T]]] = {s: {} for s in SPLITS}
    for class_name, items in items_by_class.items():
        ordered = sorted(items, key=key)
        random.Random(f"{seed}/split/{class_name}").shuffle(ordered)
        validation, test = split_sizes(len(ordered), validation_fraction, test_fraction)
        result["test"][class_name] = ordered[:test]
        result["validation"][class_name] = ordered[test : test + validation]
        result["train"][class_name] = ordered[test + validation :]
    return result


def assign_splits(
    layout: SourceLayout, files: list[SourceFile], checks: dict[str, ImageCheck], cfg: PrepareConfig
) -> dict[str, list[Entry]]:
    """Usable images per split (sorted by path), with splits lacking a folder carved out of train."""
    labels = {name: i for i, name in enumerate(layout.class_names)}
    usable: dict[str, dict[str, list[Entry]]] = {split: {} for split in layout.split_folders}
    for f in files:
        check = checks[f.path]
        if check.problem is None:
            usable[f.folder_split].setdefault(f.class_name, []).append(Entry(f, check, labels[f.class_name]))
    _require_usable_images(layout, files, checks, usable)

    fractions = {s: getattr(cfg, f"{s}_fraction") if s not in layout.split_folders else 0.0 for s in SPLITS[1:]}
    carved = stratified_split(
        usable["train"], fractions["validation"], fractions["test"], cfg.seed, key=lambda e: e.file.rel
    )
    splits: dict[str, list[Entry]] = {}
    for split in SPLITS:
        per_class = usable[split] if split in layout.split_folders and split != "train" else carved[split]
        splits[split] = sorted((e for entries in per_class.values() for e in entries), key=lambda e: e.file.rel)
        if not splits[split] and fractions.get(split, 0.0) > 0:
            minimum = 2 if split == "validation" else 3
            raise DataError(
                f"the {split} split is empty: no class has {minimum} or more usable images; "
                f"add images or set prepare.{split}_fraction=0"
            )
    return splits


def _require_usable_images(
    layout: SourceLayout,
    files: list[SourceFile],
    checks: dict[str, ImageCheck],
    usable: dict[str, dict[str, list[Entry]]],
) -> None:
    if files and not any(usable.values()):
        reasons = Counter(checks[f.path].problem for f in files)
        raise DataError(
            f"all {len(files)} files are unusable ({_reason_phrase(reasons)}; e.g. {files[0].rel}); "
            "the class folders must hold images PIL can read (JPEG, PNG, ...)"
        )
    for split, per_class in layout.files.items():
        for class_name, class_files in per_class.items():
            if usable[split].get(class_name):
                continue
            folder = "/".join(p for p in (layout.split_folders[split], class_name) if p)
            if not class_files:
                raise DataError(f"class folder {folder} is empty; add images or remove the folder")
            reasons = Counter(checks[f.path].problem for f in class_files)
            raise DataError(
                f"class folder {folder} has no usable images ({len(class_files)} file(s) skipped: "
                f"{_reason_phrase(reasons)}); add valid images or remove the folder"
            )


def _reason_phrase(reasons: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())


def class_counts(entries: list[Entry], class_names: list[str]) -> dict[str, int]:
    counts = Counter(e.file.class_name for e in entries)
    return {name: counts.get(name, 0) for name in class_names}
