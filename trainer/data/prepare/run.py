"""`trainer prepare` from start to end: list, check, split, plan, write, report, then the manifest.

Shards are written first and ``manifest.json`` last, so a dataset with a manifest is complete.
An interrupted run (SIGTERM, a full disk, an unwritable location) keeps every complete shard and
ends with one line saying what it kept and how to go on (a re-run of the same command resumes).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from trainer import storage
from trainer.config import PrepareConfig
from trainer.contract import PREPARE_REPORT_FILE
from trainer.data import scale, stats
from trainer.data.manifest import SPLITS, Manifest, Shard, manifest_path, write_manifest
from trainer.data.prepare.images import ImageCheck, check_images
from trainer.data.prepare.output import (
    error_text,
    is_disk_full,
    is_not_writable,
    refuse_unsafe_output,
    remove_previous_dataset,
    require_writable_output,
)
from trainer.data.prepare.report import PrepareReport, report_json
from trainer.data.prepare.shards import plan_shards
from trainer.data.prepare.source import SourceFile, SourceLayout, discover_source
from trainer.data.prepare.splits import Entry, assign_splits, class_counts
from trainer.data.prepare.workers import Progress, worker_pool
from trainer.data.prepare.writing import ShardSink, write_split
from trainer.errors import ConfigError, Preempted, TrainerError, TransientError


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
    refuse_unsafe_output(source, output, overwrite)
    layout = discover_source(source)
    require_writable_output(output)
    sources = [f for per_class in layout.files.values() for files in per_class.values() for f in files]
    say(f"found {len(sources)} files in {len(layout.class_names)} classes under {source}")

    sink = ShardSink(output, upload_workers, say)
    try:
        checks, splits, shards = _write_shards(layout, sources, cfg, sink)
        report = _describe(source, layout, sources, checks, splits, shards, cfg, time.monotonic() - started, sink)
        storage.write_text(storage.join(output, PREPARE_REPORT_FILE), report_json(report, sources, checks))
        write_manifest(output, report.manifest)  # last: its presence marks the dataset complete
    except BaseException as err:
        explained = _interruption(err, output, sink)
        if explained is None:
            raise
        raise explained from None
    sink.forget_progress()  # the manifest lists the shards now
    return report


def _write_shards(
    layout: SourceLayout, sources: list[SourceFile], cfg: PrepareConfig, sink: ShardSink
) -> tuple[dict[str, ImageCheck], dict[str, list[Entry]], dict[str, list[Shard]]]:
    """Check every file, split the usable ones, and write (or keep) every shard: (checks, splits, shards)."""
    with worker_pool(cfg.processes, len(sources)) as pool:
        checks = check_images(pool, sources, cfg, sink.say)
        splits = assign_splits(layout, sources, checks, cfg)
        plans = {split: plan_shards(split, splits[split], cfg) for split in SPLITS}
        remove_previous_dataset(sink.output)
        storage.makedirs(sink.output)
        with sink:
            sink.resume([shard for split in SPLITS for shard in plans[split]])
            shards = {
                split: write_split(pool, sink, split, plans[split], sink.say, cfg.jpeg_quality) for split in SPLITS
            }
        sink.remove_stale_shards({shard.path for per_split in shards.values() for shard in per_split})
    return checks, splits, shards


def _describe(
    source: str,
    layout: SourceLayout,
    sources: list[SourceFile],
    checks: dict[str, ImageCheck],
    splits: dict[str, list[Entry]],
    shards: dict[str, list[Shard]],
    cfg: PrepareConfig,
    seconds: float,
    sink: ShardSink,
) -> PrepareReport:
    """The manifest (checked against the shards written) and the report of a finished run."""
    skipped = [(f.rel, checks[f.path].problem or "") for f in sources if checks[f.path].problem]
    manifest = Manifest(
        class_names=layout.class_names,
        counts={split: class_counts(splits[split], layout.class_names) for split in SPLITS},
        shards=shards,
        source=os.path.abspath(source),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        skipped=len(skipped),
        extra={
            **_provenance(layout, cfg),
            scale.DOWNSCALED: sum(bool(entry.check.source_width) for entries in splits.values() for entry in entries),
            "image_stats": _image_stats(splits["train"], layout).to_dict(),
        },
    )
    manifest.check(manifest_path(sink.output))
    return PrepareReport(
        manifest,
        skipped,
        seconds,
        len(sources) / max(seconds, 1e-9),
        sink.output,
        details={f.rel: checks[f.path].detail for f in sources if checks[f.path].problem},
        shards_reused=sink.reused,
    )


def _interruption(err: BaseException, output: str, sink: ShardSink) -> TrainerError | None:
    """The one line for a prepare cut short: what it kept and how to go on (None: not an interruption)."""
    kept = sink.kept_phrase() if sink.total else "no shard was written yet"
    if isinstance(err, ConfigError | TransientError) and isinstance(err.__context__, OSError):
        err = err.__context__  # trainer.storage's line for a failed local write: say here what was kept
    if isinstance(err, Preempted):
        return Preempted(f"received SIGTERM; prepare of {output} stopped ({kept}); re-run the same command to resume")
    if is_disk_full(err):
        # 75 TRANSIENT rather than 64/65: nothing is wrong with the command, the settings or the
        # images, and space comes back without touching them (old datasets or another job's files
        # deleted, the volume grown). A retry costs only the unfinished shards, since a re-run
        # keeps the complete ones; the Job's backoffLimit bounds retries on a disk that stays full.
        where = output if not storage.is_remote(output) else f"the local staging directory {tempfile.gettempdir()}"
        return TransientError(
            f"no space left on device in {where} ({kept}); free space or choose a larger location, "
            "then re-run the same command to resume"
        )
    if not storage.is_remote(output) and is_not_writable(err):
        return ConfigError(
            f"cannot write the dataset directory {output} ({error_text(err)}; {kept}); choose a writable location"
        )
    return None


def _image_stats(entries: list[Entry], layout: SourceLayout) -> stats.ImageStats:
    thumbnails: dict[int, list[bytes]] = {}
    for entry in entries:
        thumbnails.setdefault(entry.label, []).append(entry.check.thumbnail)
    sizes = [(e.check.source_width or e.check.width, e.check.source_height or e.check.height) for e in entries]
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
        scale.PREPARED_FOR: cfg.image_size,
        "stored_shorter_side": scale.stored_side(cfg.image_size),
        "jpeg_quality": cfg.jpeg_quality,
    }
