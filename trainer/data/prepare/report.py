"""What `trainer prepare` reports: the printed summary and ``prepare-report.json``.

Counts per split and class, the image stats the training plan uses (trainer.data.stats), and
every skipped file with its reason and what was found, grouped by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from trainer import storage
from trainer.contract import PREPARE_REPORT_FILE
from trainer.data import stats
from trainer.data.manifest import SPLITS, Manifest, manifest_path
from trainer.data.prepare.images import TOO_LARGE, TOO_MANY_PIXELS, ImageCheck
from trainer.data.prepare.source import SourceFile

#: Reasons whose detail (sizes against the cap) is short enough for the printed summary.
_SUMMARY_DETAILS = (TOO_LARGE, TOO_MANY_PIXELS)


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


def report_json(report: PrepareReport, files: list[SourceFile], checks: dict[str, ImageCheck]) -> str:
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
