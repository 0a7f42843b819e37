"""What `trainer prepare` learns about the images for the training plan: their size, and whether
a left-right flip turns an image of one class into something else.

Both are facts of the data that decide whether a default helps or hurts: training at 224 px on
32 px scans upsamples each image 7x for a model 49x slower, and flipping digits or text makes
images of no class (or of another: a flipped 2 is close to a 5). They are measured once, cheaply,
while `prepare` checks every image, and stored in the manifest's ``extra["image_stats"]``.

Mirror dependence is measured, not guessed from class names: a nearest-class-mean classifier on
16x16 grey thumbnails (each image standardised) is scored on the training images as they are and
mirrored. Natural photos are taken facing either way, so mirroring costs such a classifier
little; for glyphs it costs most of what it gets above chance. Where the classifier is near
chance on the images as they are, the data says nothing and flips stay on.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from trainer.config import SMALL_INPUT_SIZE

THUMBNAIL_SIDE = 16
#: Mirroring that costs at least this share of the above-chance accuracy makes the classes mirror-dependent.
MIRROR_DEPENDENT_SHARE = 0.5
#: Below this margin over chance (images as they are) the thumbnails tell nothing about mirroring.
MIN_INFORMATIVE_MARGIN = 0.1
#: Thumbnails used per class (the first ones in the split's order): enough for a stable mean.
MAX_PER_CLASS = 500
#: Training far above the source images' size: warn beyond this factor of their median shorter side.
UPSAMPLE_WARNING_FACTOR = 2.0


def default_random_crop(image_size: int) -> bool:
    """data.augment.random_crop: auto. At a small model input a random-area crop keeps too little."""
    return image_size > SMALL_INPUT_SIZE


def default_horizontal_flip(stats: ImageStats | None) -> bool:
    """data.augment.horizontal_flip: auto. Off only where `prepare` measured mirror dependence."""
    return not (stats is not None and stats.mirror_dependent)


def thumbnail(image: Any) -> bytes:
    """A PIL image as THUMBNAIL_SIDE^2 grey bytes (what mirror dependence is measured on)."""
    from PIL import Image

    return image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BOX).tobytes()


@dataclass(frozen=True)
class ImageStats:
    images: int  # training images measured
    median_width: int
    median_height: int
    nearest_mean_accuracy: float  # on the thumbnails as they are
    mirrored_accuracy: float  # on the same thumbnails mirrored
    chance: float

    @property
    def median_side(self) -> int:
        return min(self.median_width, self.median_height)

    @property
    def mirror_cost(self) -> float:
        """Share of the above-chance accuracy that mirroring loses (0 when the thumbnails say nothing)."""
        margin = self.nearest_mean_accuracy - self.chance
        if margin < MIN_INFORMATIVE_MARGIN:
            return 0.0
        return max(0.0, (self.nearest_mean_accuracy - self.mirrored_accuracy) / margin)

    @property
    def mirror_dependent(self) -> bool:
        return self.mirror_cost >= MIRROR_DEPENDENT_SHARE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mirror_cost": round(self.mirror_cost, 3), "mirror_dependent": self.mirror_dependent}

    @classmethod
    def from_manifest_extra(cls, extra: Mapping[str, Any]) -> ImageStats | None:
        """The stats `prepare` stored, or None for a dataset prepared before they existed."""
        raw = extra.get("image_stats")
        if not isinstance(raw, Mapping):
            return None
        try:
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None

    def report_lines(self, image_size: int | None = None) -> list[str]:
        """What `prepare` prints: the facts, and the settings they call for."""
        lines = [
            f"source images: median {self.median_width}x{self.median_height} px; a left-right flip "
            + (
                f"changes what they show (mirroring costs {self.mirror_cost:.0%} of a simple classifier's "
                "accuracy above chance): training leaves flips off (data.augment.horizontal_flip: auto)"
                if self.mirror_dependent
                else "keeps what they show: training flips them (data.augment.horizontal_flip: auto)"
            )
        ]
        suggested = suggested_image_size(self.median_side)
        if image_size is None or image_size > UPSAMPLE_WARNING_FACTOR * self.median_side:
            lines.append(
                f"train at about their size: --set data.image_size={suggested} "
                f"(the default 224 upsamples them {224 / max(self.median_side, 1):.0f}x and costs "
                f"{(224 / suggested) ** 2:.0f}x the compute)"
                if suggested < 224
                else "train at the default data.image_size=224"
            )
        return lines


def suggested_image_size(median_side: int) -> int:
    """The model input closest to the images' own size: a multiple of 32 (VGG16's five poolings), 32..224."""
    return int(min(224, max(32, round(median_side / 32) * 32)))


def image_stats(
    sizes: Sequence[tuple[int, int]], thumbnails: Mapping[int, Sequence[bytes]], num_classes: int
) -> ImageStats:
    """Stats of the training images: ``sizes`` (width, height); ``thumbnails`` label -> thumbnail bytes."""
    import numpy as np

    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    labels, rows = [], []
    for label, items in thumbnails.items():
        for item in items[:MAX_PER_CLASS]:
            labels.append(label)
            rows.append(np.frombuffer(item, np.uint8))
    images = _standardised(np.stack(rows).astype(np.float64).reshape(-1, THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    labels_array = np.asarray(labels)
    means = np.stack([images[labels_array == c].mean(axis=0) for c in sorted(thumbnails)])
    classes = np.asarray(sorted(thumbnails))
    return ImageStats(
        images=len(sizes),
        median_width=round(statistics.median(widths)),
        median_height=round(statistics.median(heights)),
        nearest_mean_accuracy=round(_nearest_mean_accuracy(images, labels_array, means, classes), 4),
        mirrored_accuracy=round(_nearest_mean_accuracy(images[:, :, ::-1], labels_array, means, classes), 4),
        chance=round(1.0 / num_classes, 4),
    )


def _standardised(images):
    import numpy as np

    flat = images.reshape(len(images), -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    scale = np.maximum(centred.std(axis=1, keepdims=True), 1e-6)
    return (centred / scale).reshape(images.shape)


def _nearest_mean_accuracy(images, labels, means, classes, chunk: int = 4096) -> float:
    import numpy as np

    flat, centres = images.reshape(len(images), -1), means.reshape(len(means), -1)
    centre_norms = (centres**2).sum(axis=1)
    correct = 0
    for start in range(0, len(flat), chunk):  # bounded memory: chunk x classes distances at a time
        rows = flat[start : start + chunk]
        distances = centre_norms[None, :] - 2.0 * rows @ centres.T  # + |row|^2, the same for every class
        correct += int(np.sum(classes[np.argmin(distances, axis=1)] == labels[start : start + chunk]))
    return correct / len(flat)
