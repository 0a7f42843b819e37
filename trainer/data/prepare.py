"""`trainer prepare`: turn an image folder into TFRecord shards plus a manifest.

The source is the folder layout Keras' ``flow_from_directory`` reads, either flat
(``SOURCE/<class>/<images>``) or already split (``SOURCE/train/<class>/...`` with optional
``validation/`` (or ``val/``) and ``test/``). Splits without a folder are carved out of
train per class with a seeded, stratified split.

Every file is fully decoded once with PIL in a pool of worker processes, so damaged or
unusable files are found here, listed in ``prepare-report.json`` and never reach a
training job. Memory stays bounded: a file above ``prepare.max_file_mb`` is skipped from
its size alone, and one above ``prepare.max_image_megapixels`` from its header, before
any pixel is decoded. JPEGs are stored as their original bytes (training decodes only the
crop window); everything else becomes an RGB PNG. Shards are written first and
``manifest.json`` last, so a dataset with a manifest is complete.

An interrupted run (SIGTERM, a full disk, a crash) keeps what it completed: locally each
shard is written under a temporary name, renamed when complete and recorded in
``prepare-progress.json``; a re-run of the same command keeps every recorded shard whose
contents would be the same and writes only the rest. On ``gs://`` the upload skips shards
already there intact.

Only the local source folder is read with the standard library; the output goes through
:mod:`trainer.storage`, so it may be a ``gs://`` prefix.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

from trainer import storage
from trainer.config import PrepareConfig
from trainer.contract import MANIFEST_FILE, PREPARE_PROGRESS_FILE, PREPARE_REPORT_FILE
from trainer.data import records, stats
from trainer.data.manifest import SPLITS, Manifest, Shard, manifest_path, write_manifest
from trainer.errors import ConfigError, DataError, Preempted, TrainerError, TransientError

T = TypeVar("T")
Progress = Callable[[str], None]

# Why a file was skipped. The report groups skipped files by these reasons.
NOT_AN_IMAGE = "not an image"
CORRUPT = "corrupt"
TOO_SMALL = "too small"
TOO_LARGE = "too large"  # the file is above prepare.max_file_mb: not read at all
TOO_MANY_PIXELS = "too many pixels"  # the header says above prepare.max_image_megapixels: not decoded
UNSUPPORTED = "unsupported"  # decodes, but has no RGB conversion (e.g. an exotic colour mode)
UNREADABLE = "unreadable"  # the file could not be read at all (permissions, I/O error, not a regular file)
#: Reasons whose detail (sizes against the cap) is short enough for the printed summary.
_SUMMARY_DETAILS = (TOO_LARGE, TOO_MANY_PIXELS)

#: Folder names of the split layout; ``val`` is accepted for validation.
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
#: PIL formats whose bytes TensorFlow's JPEG decoder reads as they are (MPO = camera JPEG + extras).
_JPEG_FORMATS = ("JPEG", "MPO")
#: JPEG colour modes stored unchanged; CMYK/YCCK JPEGs are re-encoded as RGB.
_PASSTHROUGH_JPEG_MODES = ("RGB", "L")
_REENCODED_JPEG_QUALITY = 95
_PROGRESS_SECONDS = 2.0


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ImageCheck:
    """What checking one file found; ``problem`` is None for a usable image."""

    path: str
    problem: str | None = None
    detail: str = ""
    fmt: str = ""  # record format: "jpeg" or "png"
    reencode: bool = False
    height: int = 0
    width: int = 0
    nbytes: int = 0  # size of the bytes that go into the record
    thumbnail: bytes = b""  # trainer.data.stats.thumbnail: for the image stats the training plan uses
    file_size: int = 0  # the source file as checked: a re-run keeps a shard only if its files are unchanged
    mtime_ns: int = 0


@dataclass(frozen=True)
class SourceFile:
    path: str  # local path, as opened
    rel: str  # relative to the source folder, "/"-separated: used in the report and the records
    folder_split: str  # the split whose folder holds the file
    class_name: str


@dataclass(frozen=True)
class Entry:
    """A usable image on its way into a shard."""

    file: SourceFile
    check: ImageCheck
    label: int


@dataclass
class SourceLayout:
    split_folders: dict[str, str]  # split -> folder relative to the source ("" = the source itself)
    class_names: list[str]
    files: dict[str, dict[str, list[SourceFile]]]  # folder split -> class -> files sorted by path


@dataclass
class PrepareReport:
    manifest: Manifest
    skipped: list[tuple[str, str]]  # (path relative to the source, reason)
    seconds: float
    images_per_second: float
    output: str = ""
    details: dict[str, str] = field(default_factory=dict)  # skipped path -> what was found
    shards_reused: int = 0  # complete shards of an interrupted run, kept as they were

    def skipped_by_reason(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for path, reason in self.skipped:
            grouped.setdefault(reason, []).append(path)
        return grouped

    def summary_lines(self, examples: int = 10) -> list[str]:
        m = self.manifest
        total = sum(m.split_size(s) for s in SPLITS)
        lines = [
            f"prepared {total} images in {m.num_classes} classes from {m.source} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.0f} img/s)"
        ]
        for split in SPLITS:
            if m.has_split(split):
                lines.append(
                    f"  {split}: {m.split_size(split)} images in {len(m.shards[split])} shard(s); "
                    f"{_describe_class_counts(m.counts[split])}"
                )
        image_stats = stats.ImageStats.from_manifest_extra(m.extra)
        if image_stats is not None:
            lines += image_stats.report_lines()
        if self.skipped:
            grouped = self.skipped_by_reason()
            lines.append(f"skipped {len(self.skipped)} file(s): {_count_phrase(grouped)}")
            for reason, paths in grouped.items():
                more = f" ... and {len(paths) - examples} more" if len(paths) > examples else ""
                shown = [
                    f"{p} ({self.details[p]})" if reason in _SUMMARY_DETAILS and self.details.get(p) else p
                    for p in paths[:examples]
                ]
                lines.append(f"  {reason}: {', '.join(shown)}{more}")
        else:
            lines.append("skipped 0 files")
        if self.shards_reused:
            lines.append(f"resumed: kept {self.shards_reused} complete shard(s) of an interrupted run")
        where = self.output or "the output directory"
        lines.append(f"manifest: {manifest_path(where)}; report: {storage.join(where, PREPARE_REPORT_FILE)}")
        return lines


def _describe_class_counts(counts: dict[str, int], limit: int = 10) -> str:
    if len(counts) <= limit:
        return ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"{min(counts.values())}-{max(counts.values())} per class"


def _count_phrase(grouped: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(paths)} {reason}" for reason, paths in grouped.items())


# --------------------------------------------------------------------------- entry point


def prepare_dataset(
    source: str,
    output: str,
    cfg: PrepareConfig,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
    upload_workers: int = 8,
) -> PrepareReport:
    """Check every image under ``source`` and write shards, report and manifest to ``output``.

    Raises DataError for an unusable source, ConfigError when ``output`` already holds a
    prepared dataset and ``overwrite`` is False or cannot be written, TransientError when
    the disk fills up and Preempted on SIGTERM; the last two keep every complete shard, and
    a re-run of the same command resumes from them.
    """
    say = progress or _print_to_stderr
    started = time.monotonic()
    _refuse_unsafe_output(source, output, overwrite)
    layout = discover_source(source)
    _require_writable_output(output)
    sources = [f for per_class in layout.files.values() for files in per_class.values() for f in files]
    say(f"found {len(sources)} files in {len(layout.class_names)} classes under {source}")

    sink: ShardSink | None = None
    try:
        with _worker_pool(cfg.processes, len(sources)) as pool:
            checks = _check_images(pool, sources, cfg, say)
            splits = _assign_splits(layout, sources, checks, cfg)
            plans = {split: plan_shards(split, splits[split], cfg) for split in SPLITS}
            _remove_previous_dataset(output)
            storage.makedirs(output)
            with ShardSink(output, upload_workers, say) as sink:
                sink.resume([shard for split in SPLITS for shard in plans[split]])
                shards = {split: _write_split(pool, sink, split, plans[split], say) for split in SPLITS}
            sink.remove_stale_shards({shard.path for per_split in shards.values() for shard in per_split})

        skipped = [(f.rel, checks[f.path].problem or "") for f in sources if checks[f.path].problem]
        manifest = Manifest(
            class_names=layout.class_names,
            counts={split: _class_counts(splits[split], layout.class_names) for split in SPLITS},
            shards=shards,
            source=os.path.abspath(source),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            skipped=len(skipped),
            extra={**_provenance(layout, cfg), "image_stats": _image_stats(splits["train"], layout).to_dict()},
        )
        manifest.check(manifest_path(output))
        seconds = time.monotonic() - started
        report = PrepareReport(
            manifest,
            skipped,
            seconds,
            len(sources) / max(seconds, 1e-9),
            output,
            details={f.rel: checks[f.path].detail for f in sources if checks[f.path].problem},
            shards_reused=sink.reused,
        )
        storage.write_text(storage.join(output, PREPARE_REPORT_FILE), _report_json(report, sources, checks))
        write_manifest(output, manifest)  # last: its presence marks the dataset complete
    except BaseException as err:
        explained = _interruption(err, output, sink)
        if explained is None:
            raise
        raise explained from None
    sink.forget_progress()  # the manifest lists the shards now
    return report


def _interruption(err: BaseException, output: str, sink: ShardSink | None) -> TrainerError | None:
    """The one line for a prepare cut short: what it kept and how to go on (None: not an interruption)."""
    kept = sink.kept_phrase() if sink is not None and sink.total else "no shard was written yet"
    if isinstance(err, ConfigError | TransientError) and isinstance(err.__context__, OSError):
        err = err.__context__  # trainer.storage's line for a failed local write: say here what was kept
    if isinstance(err, Preempted):
        return Preempted(f"received SIGTERM; prepare of {output} stopped ({kept}); re-run the same command to resume")
    if _is_disk_full(err):
        # 75 TRANSIENT rather than 64/65: nothing is wrong with the command, the settings or the
        # images, and space comes back without touching them (old datasets or another job's files
        # deleted, the volume grown). A retry costs only the unfinished shards, since a re-run
        # keeps the complete ones; the Job's backoffLimit bounds retries on a disk that stays full.
        where = output if not storage.is_remote(output) else f"the local staging directory {tempfile.gettempdir()}"
        return TransientError(
            f"no space left on device in {where} ({kept}); free space or choose a larger location, "
            "then re-run the same command to resume"
        )
    if not storage.is_remote(output) and _is_not_writable(err):
        return ConfigError(
            f"cannot write the dataset directory {output} ({_strerror(err)}; {kept}); choose a writable location"
        )
    return None


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    tf = sys.modules.get("tensorflow")  # TFRecordWriter reports ENOSPC as ResourceExhaustedError
    return tf is not None and isinstance(err, tf.errors.ResourceExhaustedError) and "space" in str(err).lower()


def _is_not_writable(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    tf = sys.modules.get("tensorflow")  # TFRecordWriter reports EROFS and EACCES as PermissionDeniedError
    return tf is not None and isinstance(err, tf.errors.PermissionDeniedError)


def _strerror(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return getattr(err, "message", "") or type(err).__name__


def _image_stats(entries: list[Entry], layout: SourceLayout) -> stats.ImageStats:
    thumbnails: dict[int, list[bytes]] = {}
    for entry in entries:
        thumbnails.setdefault(entry.label, []).append(entry.check.thumbnail)
    sizes = [(entry.check.width, entry.check.height) for entry in entries]
    return stats.image_stats(sizes, thumbnails, len(layout.class_names))


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _provenance(layout: SourceLayout, cfg: PrepareConfig) -> dict[str, Any]:
    return {
        "split_from": {s: ("folder" if s in layout.split_folders else "seeded split of train") for s in SPLITS},
        "seed": cfg.seed,
        "validation_fraction": cfg.validation_fraction,
        "test_fraction": cfg.test_fraction,
        "min_image_side": cfg.min_image_side,
        "max_file_mb": cfg.max_file_mb,
        "max_image_megapixels": cfg.max_image_megapixels,
    }


# --------------------------------------------------------------------------- output directory


def _refuse_unsafe_output(source: str, output: str, overwrite: bool) -> None:
    if not output:
        raise ConfigError("no output directory given; pass the directory (or gs:// prefix) for the prepared dataset")
    if not storage.is_remote(output) and not storage.is_remote(source):
        src, out = os.path.realpath(source), os.path.realpath(output)
        if out == src or out.startswith(src + os.sep):
            # It would be read back as a class folder on the next run.
            raise ConfigError(f"output {output} is inside the source folder {source}; write it somewhere else")
    if storage.exists(manifest_path(output)) and not overwrite:
        raise ConfigError(
            f"{output} already holds a prepared dataset ({MANIFEST_FILE}); pass --overwrite or choose another directory"
        )


def _require_writable_output(output: str) -> None:
    """A local dataset directory that cannot be written fails now, not after every image is checked."""
    if storage.is_remote(output):
        return  # gs://: a missing permission fails the first write, naming the role it needs (trainer.gcs)
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConfigError(
            f"dataset {output} exists and is not a directory; pass a new or existing directory for the prepared dataset"
        )
    existing = os.path.abspath(output)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"cannot create the dataset directory {output}: {existing} is not a directory; fix the path")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        why = f"{existing} is on a read-only file system"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no write permission on {existing}"
    else:
        return
    raise ConfigError(f"cannot write the dataset directory {output} ({why}); choose a writable location")


def _remove_previous_dataset(output: str) -> None:
    """Delete an old manifest first (so the dataset reads as unfinished), then its report.

    Shards are left to the ShardSink: it keeps those an interrupted run completed (when
    their contents would be the same) and deletes the rest.
    """
    storage.remove_tree(manifest_path(output))
    storage.remove_tree(storage.join(output, PREPARE_REPORT_FILE))


#: A shard is written under its name plus this suffix and renamed when complete (local output).
PARTIAL_SUFFIX = ".partial"
#: Part of every shard fingerprint: a change to how records are made must not keep old shards.
_SHARD_FORMAT_VERSION = 1


def _existing_shards(output: str, partial: bool = False) -> list[str]:
    suffixes = (records.SHARD_SUFFIX, records.SHARD_SUFFIX + PARTIAL_SUFFIX) if partial else (records.SHARD_SUFFIX,)
    return [
        path
        for split in SPLITS
        for suffix in suffixes
        for path in storage.glob(storage.join(output, f"{split}-*-of-*{suffix}"))
    ]


class ShardSink:
    """Where `prepare` writes shards, and what an interrupted run left that a re-run keeps.

    Locally: in place, each under ``<name>.partial`` until complete, then renamed and
    recorded in prepare-progress.json with its fingerprint; :meth:`resume` keeps recorded
    shards whose fingerprint is unchanged. For gs://: a local staging file per shard,
    uploaded in parallel (while later shards are built) and skipped when an intact copy
    (same size and crc32c) is already there, which makes an interrupted run resumable.
    """

    def __init__(self, output: str, upload_workers: int, say: Progress):
        self.output, self.say = output, say
        self.remote = storage.is_gcs(output)
        self._staging: tempfile.TemporaryDirectory | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._uploads: list[Future] = []
        self.uploaded = self.skipped = 0
        self.bytes_uploaded = 0
        self._count_lock = threading.Lock()
        self.upload_workers = upload_workers
        self.total = 0  # shards planned
        self.uploads_done = 0  # gs://: shards uploaded or found intact
        self.reused = 0  # complete shards of an interrupted run kept as they were (local)
        self.discarded = False  # a shard cut off mid-write was deleted
        self._reusable: dict[str, Shard] = {}
        self._progress: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> ShardSink:
        if self.remote:
            self._staging = tempfile.TemporaryDirectory(prefix="prepare-")
            self._pool = ThreadPoolExecutor(self.upload_workers, thread_name_prefix="upload")
        return self

    @property
    def _progress_path(self) -> str:
        return storage.join(self.output, PREPARE_PROGRESS_FILE)

    def resume(self, planned: Sequence[PlannedShard]) -> None:
        """Keep the recorded shards whose contents would be the same; delete every other shard file.

        Deleting stale and partial shards first also frees their space for the new ones.
        """
        self.total = len(planned)
        if self.remote:
            return  # the uploads skip intact shards; stale ones go at the end (remove_stale_shards)
        recorded = self._read_progress()
        for shard in planned:
            entry = recorded.get(shard.name, {})
            path = storage.join(self.output, shard.name)
            if (
                entry.get("fingerprint") == shard.fingerprint
                and entry.get("records") == len(shard.entries)
                and os.path.isfile(path)
                and os.path.getsize(path) == entry.get("bytes")
            ):
                self._reusable[shard.name] = Shard(path=shard.name, records=entry["records"], bytes=entry["bytes"])
        for path in _existing_shards(self.output, partial=True):
            if os.path.basename(path) not in self._reusable:
                os.remove(path)
        # Rewritten with the first new shard; until then the record on disk still holds these (and maybe more).
        self._progress = {name: recorded[name] for name in self._reusable}

    def _read_progress(self) -> dict[str, dict[str, Any]]:
        try:
            body = json.loads(storage.read_text(self._progress_path))
        except (OSError, ValueError):
            return {}  # none (a first run, or one that finished), or unreadable: nothing is kept
        if not isinstance(body, dict) or body.get("version") != _SHARD_FORMAT_VERSION:
            return {}
        shards = body.get("shards")
        return {k: v for k, v in shards.items() if isinstance(v, dict)} if isinstance(shards, dict) else {}

    def _write_progress(self) -> None:
        body = {"version": _SHARD_FORMAT_VERSION, "shards": self._progress}
        storage.write_text(self._progress_path, json.dumps(body, indent=1, sort_keys=True) + "\n")

    def reuse(self, shard: PlannedShard) -> Shard | None:
        """The shard as an interrupted run completed it, or None when it must be written."""
        kept = self._reusable.get(shard.name)
        if kept is not None:
            self.reused += 1
        return kept

    def path_for(self, name: str) -> str:
        """Where the TFRecord writer writes shard ``name``."""
        if self._staging:
            return os.path.join(self._staging.name, name)
        return storage.join(self.output, name + PARTIAL_SUFFIX)

    def discard(self, name: str) -> None:
        """The shard was cut off mid-write: delete what it has (a re-run deletes it otherwise)."""
        with contextlib.suppress(OSError):
            os.remove(self.path_for(name))
            self.discarded = True

    def finished(self, shard: PlannedShard) -> Shard:
        """The shard is written: rename and record it (local) or start its upload (gs://)."""
        path = self.path_for(shard.name)
        nbytes = os.path.getsize(path)
        if self._pool:
            self._uploads.append(self._pool.submit(self._upload, path, storage.join(self.output, shard.name)))
        else:
            final = storage.join(self.output, shard.name)
            record = {"fingerprint": shard.fingerprint, "records": len(shard.entries), "bytes": nbytes}
            with _signals_deferred():  # a SIGTERM lands before or after: a shard and its record go together
                os.replace(path, final)
                self._progress[shard.name] = record
                try:
                    self._write_progress()
                except BaseException:  # e.g. no space left for the record: then the shard does not count either
                    del self._progress[shard.name]
                    with contextlib.suppress(OSError):
                        os.remove(final)
                    self.discarded = True
                    raise
        return Shard(path=shard.name, records=len(shard.entries), bytes=nbytes)

    def _upload(self, path: str, uri: str) -> None:
        from trainer import gcs

        sent = gcs.upload_file(path, uri)
        with self._count_lock:
            if sent:
                self.uploaded += 1
                self.bytes_uploaded += os.path.getsize(path)
            else:
                self.skipped += 1
            self.uploads_done += 1
        os.remove(path)  # keep local disk use near the shards in flight

    def kept_phrase(self) -> str:
        """What an interrupted run leaves: ``3 of 18 shard(s) complete and kept, the partial one removed``."""
        complete = self.uploads_done if self.remote else len(self._progress)
        partial = ", the partial one removed" if self.discarded else ""
        return f"{complete} of {self.total} shard(s) complete and kept{partial}"

    def forget_progress(self) -> None:
        """The dataset is complete: its manifest lists the shards, the progress record goes."""
        if not self.remote:
            with contextlib.suppress(OSError):
                os.remove(self._progress_path)

    def __exit__(self, *exc_info) -> None:
        if not self._pool:
            return
        try:
            for future in self._uploads:
                future.result()  # the first failed upload raises here
            self.say(
                f"uploaded {self.uploaded} shard(s) ({self.bytes_uploaded / 1e6:.1f} MB), "
                f"{self.skipped} already there intact"
            )
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._staging.cleanup()

    def remove_stale_shards(self, keep: set[str]) -> None:
        """Delete shards of an earlier, different run (names not in ``keep``); gs:// only (resume() did it locally)."""
        if not self.remote:
            return
        for uri in _existing_shards(self.output):
            if uri.rsplit("/", 1)[-1] not in keep:
                storage.remove_tree(uri)


# --------------------------------------------------------------------------- discovery


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


# --------------------------------------------------------------------------- checking images


def inspect_image(path: str, min_side: int, *, max_bytes: int, max_pixels: int) -> ImageCheck:
    """Check one file and decide how it will be stored (runs in a worker process).

    Memory stays bounded whatever the file holds: its size is checked before a byte is
    read, its pixel count (from the header, all that PIL's ``open`` reads) before a pixel
    is decoded. Only then is every pixel decoded, so truncated or damaged data fails here.
    """
    try:
        fh, st = _open_regular_file(path)
    except OSError as err:
        return ImageCheck(path, UNREADABLE, err.strerror or str(err))
    with fh:
        check = _inspect_open_file(path, fh, st.st_size, min_side, max_bytes, max_pixels)
    return replace(check, file_size=st.st_size, mtime_ns=st.st_mtime_ns)


def _inspect_open_file(
    path: str, fh: BinaryIO, size: int, min_side: int, max_bytes: int, max_pixels: int
) -> ImageCheck:
    from PIL import Image, UnidentifiedImageError

    if size > max_bytes:
        return ImageCheck(path, TOO_LARGE, f"{size} bytes > {max_bytes}, the cap set by prepare.max_file_mb")
    try:
        with _pil_pixel_limit(None):  # the cap is checked below, naming the image's size
            image = Image.open(fh)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            return ImageCheck(
                path,
                TOO_MANY_PIXELS,
                f"{width}x{height} = {width * height} pixels > {max_pixels}, "
                "the cap set by prepare.max_image_megapixels",
            )
        with _pil_pixel_limit(max_pixels):  # PIL's own guard at the same cap, for the frames after the first
            image.load()  # decodes every pixel: truncated or damaged data fails here
    except TrainerError:
        raise  # SIGTERM (Preempted) while checking in this process says nothing about the file
    except UnidentifiedImageError:
        return ImageCheck(path, NOT_AN_IMAGE, "PIL cannot identify the file format")
    except Image.DecompressionBombError as err:
        return ImageCheck(path, TOO_MANY_PIXELS, str(err))
    except Exception as err:  # PIL signals bad data with many exception types
        return ImageCheck(path, CORRUPT, f"{type(err).__name__}: {err}")
    if min(width, height) < min_side:
        return ImageCheck(path, TOO_SMALL, f"{width}x{height}, shorter side below {min_side}")
    if image.format in _JPEG_FORMATS and image.mode in _PASSTHROUGH_JPEG_MODES:
        thumb = stats.thumbnail(image)
        return ImageCheck(path, None, fmt="jpeg", height=height, width=width, nbytes=size, thumbnail=thumb)
    try:
        encoded, fmt = reencode(image)
        thumb = stats.thumbnail(to_rgb(image))
    except (ValueError, OSError) as err:
        return ImageCheck(path, UNSUPPORTED, f"mode {image.mode}: {err}")
    return ImageCheck(
        path, None, fmt=fmt, reencode=True, height=height, width=width, nbytes=len(encoded), thumbnail=thumb
    )


def _open_regular_file(path: str) -> tuple[BinaryIO, os.stat_result]:
    """``path`` opened for reading, if it is a regular file: a FIFO would block, a device never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO returns at once
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file but a {_file_kind(st.st_mode)}", path)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")]
    kinds += [(stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")]
    return next((name for test, name in kinds if test(mode)), "special file")


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's decompression-bomb guard at ``max_pixels`` (None: off), without its warnings.

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that: half the cap
    makes it raise at the cap, and the warnings would only be noise on stderr.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else (max_pixels + 1) // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def reencode(image: Any) -> tuple[bytes, str]:
    """A decoded PIL image as (bytes, record format): CMYK JPEGs -> RGB JPEG, the rest -> RGB PNG."""
    buffer = io.BytesIO()
    if image.format in _JPEG_FORMATS:
        image.convert("RGB").save(buffer, "JPEG", quality=_REENCODED_JPEG_QUALITY)
        return buffer.getvalue(), "jpeg"
    to_rgb(image).save(buffer, "PNG")
    return buffer.getvalue(), "png"


def to_rgb(image: Any) -> Any:
    """RGB for any PIL mode: transparency over white, 16-bit grey scaled down instead of clipped."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I" or image.mode.startswith("I;16"):
        import numpy as np

        grey = (np.asarray(image, dtype=np.int64) // 257).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def _check_images(pool: _Workers, files: list[SourceFile], cfg: PrepareConfig, say: Progress) -> dict[str, ImageCheck]:
    check = functools.partial(
        inspect_image,
        min_side=cfg.min_image_side,
        max_bytes=int(cfg.max_file_mb * 1e6),
        max_pixels=int(cfg.max_image_megapixels * 1e6),
    )
    meter = _Meter("checked", len(files), say)
    results: dict[str, ImageCheck] = {}
    for result in pool.map_unordered(check, [f.path for f in files]):
        results[result.path] = result
        meter.update(len(results))
    return results


# --------------------------------------------------------------------------- splits


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


def _assign_splits(
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


def _class_counts(entries: list[Entry], class_names: list[str]) -> dict[str, int]:
    counts = Counter(e.file.class_name for e in entries)
    return {name: counts.get(name, 0) for name in class_names}


# --------------------------------------------------------------------------- shards


def shard_count(total_bytes: int, images: int, shard_size_mb: float, min_shards: int) -> int:
    """Shards for a split: enough to keep each near ``shard_size_mb``, at least ``min_shards``,
    never more than one per image (an empty shard would give a reader nothing)."""
    if images <= 0:
        return 0
    by_size = math.ceil(total_bytes / (shard_size_mb * 1e6))
    return max(1, min(max(by_size, min_shards), images))


def assign_to_shards(count: int, shards: int, seed: int | str) -> list[list[int]]:
    """Item indices per shard: a seeded shuffle cut into runs whose lengths differ by at most one.

    The shuffle mixes classes within every shard, so a worker reading a few shards still
    sees all classes.
    """
    if count == 0:
        return []
    order = list(range(count))
    random.Random(f"{seed}").shuffle(order)
    base, extra = divmod(count, shards)
    cuts, start = [], 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0)
        cuts.append(order[start:end])
        start = end
    return cuts


@dataclass(frozen=True)
class PlannedShard:
    name: str
    entries: list[Entry]
    fingerprint: str  # of everything that decides the shard's bytes: same fingerprint, same shard


def plan_shards(split: str, entries: list[Entry], cfg: PrepareConfig) -> list[PlannedShard]:
    """The shards of a split: names, the images of each (a seeded assignment) and their fingerprints."""
    n = shard_count(sum(e.check.nbytes for e in entries), len(entries), cfg.shard_size_mb, cfg.min_shards)
    plan = [[entries[i] for i in shard] for shard in assign_to_shards(len(entries), n, f"{cfg.seed}/shards/{split}")]
    names = [records.shard_name(split, index, n) for index in range(n)]
    return [PlannedShard(name, shard, _fingerprint(name, shard)) for name, shard in zip(names, plan, strict=True)]


def _fingerprint(name: str, entries: list[Entry]) -> str:
    """A shard's records follow from its name, its images in order, and each source file as checked."""
    digest = hashlib.sha256(f"{_SHARD_FORMAT_VERSION}\n{name}\n".encode())
    for e in entries:
        c = e.check
        fields = [e.file.rel, e.file.class_name, e.label, c.fmt, c.reencode, c.height, c.width, c.file_size, c.mtime_ns]
        digest.update(json.dumps(fields).encode() + b"\n")
    return digest.hexdigest()


def _write_split(pool: _Workers, sink: ShardSink, split: str, plan: list[PlannedShard], say: Progress) -> list[Shard]:
    import tensorflow as tf

    meter = _Meter(f"wrote {split}", sum(len(shard.entries) for shard in plan), say)
    written: list[Shard] = []
    done = 0
    for shard in plan:
        kept = sink.reuse(shard)
        if kept is None:
            path = sink.path_for(shard.name)
            # One shard's payloads at a time keeps memory near one shard, however large the split.
            jobs = [(e.file.path, e.check.reencode, e.check.file_size) for e in shard.entries]
            try:
                payloads = pool.map_ordered(_record_payload, jobs)
                with tf.io.TFRecordWriter(path) as writer:
                    for entry, payload in zip(shard.entries, payloads, strict=True):
                        # deterministic: protobuf map order otherwise varies between processes, and shards must be
                        # byte-identical across runs (reproducible datasets; resumable uploads skip intact shards).
                        writer.write(_example(entry, payload).SerializeToString(deterministic=True))
                        done += 1
                        meter.update(done)
            except BaseException:
                sink.discard(shard.name)  # SIGTERM, a full disk, a changed file: no partial shard stays
                raise
            kept = sink.finished(shard)
        else:
            done += len(shard.entries)
            meter.update(done)
        written.append(kept)
    return written


def _record_payload(job: tuple[str, bool, int]) -> bytes:
    """The bytes stored for one checked image (runs in a worker process)."""
    from PIL import Image

    path, needs_reencode, checked_size = job
    try:
        fh, st = _open_regular_file(path)
        with fh:
            if st.st_size != checked_size:
                raise OSError(f"its size is {st.st_size} bytes, {checked_size} when checked")
            data = fh.read(checked_size + 1)
        if len(data) != checked_size:
            raise OSError(f"read {len(data)} bytes, {checked_size} when checked")
        if not needs_reencode:
            return data
        image = Image.open(io.BytesIO(data))
        image.load()
        return reencode(image)[0]
    except TrainerError:
        raise  # SIGTERM (Preempted) while writing in this process says nothing about the file
    except Exception as err:
        raise DataError(f"{path} changed while prepare was running ({err}); run prepare again") from None


def _example(entry: Entry, payload: bytes) -> Any:
    c = entry.check
    return records.make_example(payload, c.fmt, c.height, c.width, entry.label, entry.file.class_name, entry.file.rel)


# --------------------------------------------------------------------------- report file


def _report_json(report: PrepareReport, files: list[SourceFile], checks: dict[str, ImageCheck]) -> str:
    m = report.manifest
    skipped = [
        {"path": f.rel, "reason": checks[f.path].problem, "detail": checks[f.path].detail}
        for f in files
        if checks[f.path].problem
    ]
    body = {
        "source": m.source,
        "output": report.output,
        "created": m.created,
        "seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 1),
        "files": len(files),
        "images": {split: m.split_size(split) for split in SPLITS},
        "image_stats": m.extra.get("image_stats"),  # what the training plan decides from (trainer.data.stats)
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped).most_common()),
        "skipped": skipped,
        "shards_reused": report.shards_reused,  # complete shards of an interrupted run, kept by this one
    }
    return json.dumps(body, indent=2) + "\n"


# --------------------------------------------------------------------------- processes and progress


class _Workers:
    """A process pool, or this process alone when one worker is enough (a pool of one is only overhead)."""

    def __init__(self, pool: Any, workers: int) -> None:
        self._pool = pool
        self.workers = workers

    def map_unordered(self, fn: Callable[[Any], T], items: Sequence[Any]) -> Iterator[T]:
        if self._pool is None:
            return map(fn, items)
        return self._pool.imap_unordered(fn, items, self._chunksize(len(items)))

    def map_ordered(self, fn: Callable[[Any], T], items: Sequence[Any]) -> Iterator[T]:
        if self._pool is None:
            return map(fn, items)
        return self._pool.imap(fn, items, self._chunksize(len(items)))

    def _chunksize(self, jobs: int) -> int:
        # Big enough to amortise inter-process overhead, small enough to balance the load.
        return max(1, min(64, jobs // (self.workers * 8)))


@contextlib.contextmanager
def _worker_pool(processes: int, jobs: int) -> Iterator[_Workers]:
    workers = min(processes or _usable_cpus(), max(jobs, 1))
    if workers <= 1:
        yield _Workers(None, 1)
        return
    with multiprocessing.get_context(_start_method()).Pool(workers, initializer=_reset_signals) as pool:
        yield _Workers(pool, workers)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done; then their handlers run.

    A handler swap, not a signal mask: with the pool's threads in this process, a signal the
    main thread blocks is taken by another thread, and Python still runs the handler here.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed (and only run) in the main thread
        return
    received: list[int] = []
    stopping = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, lambda n, _frame: received.append(n)) for signum in stopping}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # e.g. the CLI's: raises Preempted
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def _reset_signals() -> None:
    # Forked workers inherit the CLI's SIGTERM handler; the pool stops them with SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _usable_cpus() -> int:
    # The CPUs this process may run on (a container's cpuset), not every core of the host.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_method() -> str:
    """fork while it is safe, spawn once TensorFlow runs in this process.

    fork is fast and works from scripts without an ``if __name__ == "__main__"`` guard, but
    it would copy TensorFlow's threads in an undefined state; spawned workers import only
    this module and PIL (they need the guard in the calling script).
    """
    return "spawn" if "tensorflow" in sys.modules else "fork"


@dataclass
class _Meter:
    """Reports ``done/total`` every 2 seconds; quick runs (under 2 s) stay quiet."""

    verb: str
    total: int
    say: Progress
    started: float = field(default_factory=time.monotonic)
    last_time: float = field(default_factory=time.monotonic)

    def update(self, done: int) -> None:
        now = time.monotonic()
        finished_slowly = done == self.total and now - self.started >= _PROGRESS_SECONDS
        if now - self.last_time >= _PROGRESS_SECONDS or finished_slowly:
            self.last_time = now
            rate = done / max(now - self.started, 1e-9)
            self.say(f"{self.verb} {done}/{self.total} images ({100 * done // max(self.total, 1)}%), {rate:.0f} img/s")
