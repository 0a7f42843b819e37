"""The dataset manifest: what `prepare` wrote and what training reads.

``manifest.json`` sits at the top of a prepared dataset and is written last, so a
dataset without one is unfinished. It records the schema version, the class names in
label order, image counts per split and class, and every shard with its size and
record count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer import storage
from trainer.contract import MANIFEST_FILE
from trainer.errors import ConfigError, DataError

SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset directory
    records: int
    bytes: int


@dataclass
class Manifest:
    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split -> class name -> images
    shards: dict[str, list[Shard]]  # split -> shards in order
    schema_version: int = SCHEMA_VERSION
    source: str = ""
    created: str = ""
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_size(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())

    def has_split(self, split: str) -> bool:
        return self.split_size(split) > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> Manifest:
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(
                f"{where}: manifest schema_version {version!r} is not supported (expected {SCHEMA_VERSION}); "
                "re-run `trainer prepare` with this version of the trainer"
            )
        try:
            shards = {
                split: [Shard(path=s["path"], records=int(s["records"]), bytes=int(s["bytes"])) for s in items]
                for split, items in raw["shards"].items()
            }
            manifest = cls(
                class_names=[str(c) for c in raw["class_names"]],
                counts={split: {str(k): int(v) for k, v in per.items()} for split, per in raw["counts"].items()},
                shards=shards,
                schema_version=version,
                source=str(raw.get("source", "")),
                created=str(raw.get("created", "")),
                skipped=int(raw.get("skipped", 0)),
                extra=dict(raw.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{where}: manifest is malformed ({err!r}); re-run `trainer prepare`") from None
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        """Consistency checks: a manifest that fails them must not be trained on."""
        if len(self.class_names) < 2:
            raise DataError(
                f"{where}: dataset has {len(self.class_names)} class(es); a classifier needs at least 2 class folders"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"{where}: manifest lists a class name twice; re-run `trainer prepare`")
        for split, shards in self.shards.items():
            records = sum(s.records for s in shards)
            if records != self.split_size(split):
                raise DataError(
                    f"{where}: split {split!r} has {records} records in its shards but {self.split_size(split)} "
                    "in its counts; the dataset is damaged, re-run `trainer prepare`"
                )
        if not self.has_split("train"):
            raise DataError(f"{where}: the dataset has no training images; re-run `trainer prepare` on a larger folder")


def check_shard_sizes(dataset_dir: str, manifest: Manifest) -> None:
    """Every shard of every split is there with the bytes the manifest records (one listing on gs://).

    A shard cut at a record boundary reads as a shorter, valid file: only its size tells.
    """
    expected = {storage.join(dataset_dir, s.path): s.bytes for shards in manifest.shards.values() for s in shards}
    sizes = storage.sizes(dataset_dir, list(expected))
    for path, want in expected.items():
        got = sizes.get(path)
        if got is None:
            raise DataError(f"shard {path} is missing (the manifest lists it); re-run `trainer prepare`")
        if got != want:
            raise DataError(
                f"shard {path} has {got} bytes but the manifest says {want} (truncated or replaced "
                "after `trainer prepare`); re-run `trainer prepare`"
            )


def count_mismatch(what: str, got: int, expected: int, files: list[str]) -> DataError:
    """The error for shards that gave another number of records than the manifest lists."""
    named = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return DataError(
        f"{what} gave {got} records but the manifest lists {expected} for its shards ({named}); "
        "the shards were changed after `trainer prepare`, re-run it"
    )


def manifest_path(dataset_dir: str) -> str:
    return storage.join(dataset_dir, MANIFEST_FILE)


def read_manifest(dataset_dir: str) -> Manifest:
    path = manifest_path(dataset_dir)
    if not dataset_dir:
        raise ConfigError("data.dataset is not set; pass --set data.dataset=DIR with a prepared dataset")
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST_FILE} in {dataset_dir}; run `trainer prepare SOURCE {dataset_dir}` first "
            "(a dataset without a manifest is missing or unfinished)"
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: manifest is not valid JSON ({err.msg} at line {err.lineno}); re-run `trainer prepare`"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: manifest must be a JSON object; re-run `trainer prepare`")
    return Manifest.from_dict(raw, path)


def write_manifest(dataset_dir: str, manifest: Manifest) -> None:
    storage.write_text(manifest_path(dataset_dir), manifest.to_json())
