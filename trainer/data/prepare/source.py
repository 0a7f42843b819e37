"""Listing the source folder: the split and class folders and every candidate file; no image is opened.

The layout is the one Keras' ``flow_from_directory`` reads, flat (``SOURCE/<class>/<images>``)
or already split (``SOURCE/train/<class>/...`` with optional ``validation/`` (or ``val/``) and
``test/``). A bad layout (no classes, one class, a class only in validation/, stray folders) is
a one-line DataError here, before any image is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainer import storage
from trainer.errors import DataError

#: Folder names of the split layout; ``val`` is accepted for validation.
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class SourceFile:
    path: str  # local path, as opened
    rel: str  # relative to the source folder, "/"-separated: used in the report and the records
    folder_split: str  # the split whose folder holds the file
    class_name: str


@dataclass
class SourceLayout:
    split_folders: dict[str, str]  # split -> folder relative to the source ("" = the source itself)
    class_names: list[str]
    files: dict[str, dict[str, list[SourceFile]]]  # folder split -> class -> files sorted by path


def discover_source(source: str) -> SourceLayout:
    """Find the split and class folders and every candidate file; no image is opened here."""
    if storage.is_remote(source):
        raise DataError(f"source {source} is not a local folder; copy it locally first (e.g. gsutil -m rsync -r)")
    if not os.path.exists(source):
        raise DataError(f"source folder {source} does not exist; pass the folder holding one sub-folder per class")
    if not os.path.isdir(source):
        raise DataError(f"source {source} is not a directory; pass the folder holding one sub-folder per class")
    split_folders = _split_folders(source)
    files = {split: _files_by_class(source, folder) for split, folder in split_folders.items()}
    class_names = sorted(files["train"])
    _check_classes(source, split_folders, files, class_names)
    return SourceLayout(split_folders, class_names, files)


def _split_folders(source: str) -> dict[str, str]:
    if not os.path.isdir(os.path.join(source, "train")):
        return {"train": ""}
    folders: dict[str, str] = {}
    for name in _visible_subdirs(source):
        split = SPLIT_FOLDERS.get(name)
        if split is None:
            raise DataError(
                f"unexpected folder {name}/ in {source}, which has train/: use only train/, validation/ (or val/) "
                "and test/, or move the class folders into train/"
            )
        if split in folders:
            raise DataError(f"{source} has both {folders[split]}/ and {name}/; keep one validation folder")
        folders[split] = name
    return folders


def _visible_subdirs(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _files_by_class(source: str, folder: str) -> dict[str, list[SourceFile]]:
    split_dir = os.path.join(source, folder)
    split = SPLIT_FOLDERS.get(folder, "train")
    return {
        class_name: [
            SourceFile(path, os.path.relpath(path, source).replace(os.sep, "/"), split, class_name)
            for path in _visible_files(os.path.join(split_dir, class_name))
        ]
        for class_name in _visible_subdirs(split_dir)
    }


def _visible_files(class_dir: str) -> list[str]:
    """Every non-hidden file below ``class_dir`` (nested folders included, like Keras), sorted."""
    found = []
    for root, dirs, names in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    return sorted(found)


def _check_classes(
    source: str, split_folders: dict[str, str], files: dict[str, dict[str, list[SourceFile]]], class_names: list[str]
) -> None:
    train_dir = os.path.join(source, split_folders["train"])
    if not class_names:
        loose = sum(1 for e in os.scandir(train_dir) if e.is_file() and not e.name.startswith("."))
        hint = f" (it holds {loose} loose file(s))" if loose else ""
        raise DataError(
            f"empty dataset: {train_dir} has no class folders{hint}; put each class's images in its own sub-folder"
        )
    if len(class_names) == 1:
        raise DataError(
            f"{train_dir} has only one class folder ({class_names[0]}); a classifier needs at least 2 class folders"
        )
    for split, folder in split_folders.items():
        if split == "train":
            continue
        if not files[split]:
            raise DataError(f"{os.path.join(source, folder)} has no class folders; add them or remove the folder")
        unknown = sorted(set(files[split]) - set(class_names))
        if unknown:
            raise DataError(
                f"class folder {folder}/{unknown[0]} has no counterpart in train/; "
                "add it to train/ or remove it (classes are defined by train/)"
            )
