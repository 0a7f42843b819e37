"""Checking and decoding one image file: is it usable, and which bytes go into its record.

Every file is fully decoded once with PIL (in a worker process), so damaged or unusable files
are found here and listed with a reason, never reaching a training job. Memory stays bounded:
a file above ``prepare.max_file_mb`` is skipped from its size alone, one above
``prepare.max_image_megapixels`` from its header, before any pixel is decoded. An image larger
than training reads (``prepare.image_size``, trainer.data.scale) is scaled down and stored as
JPEG; otherwise JPEGs are stored as their original bytes (training decodes only the crop window)
and everything else becomes an RGB PNG. Only regular files are opened: a FIFO would block, a
device never end.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from trainer.config import PrepareConfig
from trainer.data import scale, stats
from trainer.data.prepare.source import SourceFile
from trainer.data.prepare.workers import Meter, Progress, Workers
from trainer.errors import DataError, TrainerError

# Why a file was skipped. The report groups skipped files by these reasons.
NOT_AN_IMAGE = "not an image"


CORRUPT = "corrupt"


TOO_SMALL = "too small"


TOO_LARGE = "too large"  # the file is above prepare.max_file_mb: not read at all


TOO_MANY_PIXELS = "too many pixels"  # the header says above prepare.max_image_megapixels: not decoded


UNSUPPORTED = "unsupported"  # decodes, but has no RGB conversion (e.g. an exotic colour mode)


UNREADABLE = "unreadable"  # the file could not be read at all (permissions, I/O error, not a regular file)


#: PIL formats whose bytes TensorFlow's JPEG decoder reads as they are (MPO = camera JPEG + extras).
_JPEG_FORMATS = ("JPEG", "MPO")


#: JPEG colour modes stored unchanged; CMYK/YCCK JPEGs are re-encoded as RGB.
_PASSTHROUGH_JPEG_MODES = ("RGB", "L")


_REENCODED_JPEG_QUALITY = 95


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
    nbytes: int = 0  # size of the bytes that go into the record (estimated for a downscaled image)
    source_width: int = 0  # the file's own size when it is stored scaled down (width/height: as stored)
    source_height: int = 0
    thumbnail: bytes = b""  # trainer.data.stats.thumbnail: for the image stats the training plan uses
    file_size: int = 0  # the source file as checked: a re-run keeps a shard only if its files are unchanged
    mtime_ns: int = 0


def inspect_image(path: str, min_side: int, *, max_bytes: int, max_pixels: int, store_side: int = 0) -> ImageCheck:
    """Check one file and decide how it will be stored (runs in a worker process).

    Memory stays bounded whatever the file holds: its size is checked before a byte is
    read, its pixel count (from the header, all that PIL's ``open`` reads) before a pixel
    is decoded. Only then is every pixel decoded, so truncated or damaged data fails here.
    """
    try:
        fh, st = open_regular_file(path)
    except OSError as err:
        return ImageCheck(path, UNREADABLE, err.strerror or str(err))
    with fh:
        check = _inspect_open_file(path, fh, st.st_size, min_side, max_bytes, max_pixels, store_side)
    return replace(check, file_size=st.st_size, mtime_ns=st.st_mtime_ns)


def _inspect_open_file(
    path: str, fh: BinaryIO, size: int, min_side: int, max_bytes: int, max_pixels: int, store_side: int
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
    target = scale.stored_size(width, height, store_side)
    if target is not None:
        try:
            thumb = stats.thumbnail(to_rgb(image))
        except (ValueError, OSError) as err:
            return ImageCheck(path, UNSUPPORTED, f"mode {image.mode}: {err}")
        # Planning shards needs only an estimate: the bytes scale about with the pixels.
        estimate = max(1, size * target[0] * target[1] // (width * height))
        return ImageCheck(
            path, None, fmt="jpeg", reencode=True, width=target[0], height=target[1], nbytes=estimate,
            thumbnail=thumb, source_width=width, source_height=height,
        )  # fmt: skip
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


def open_regular_file(path: str) -> tuple[BinaryIO, os.stat_result]:
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


def check_images(pool: Workers, files: list[SourceFile], cfg: PrepareConfig, say: Progress) -> dict[str, ImageCheck]:
    check = functools.partial(
        inspect_image,
        min_side=cfg.min_image_side,
        max_bytes=int(cfg.max_file_mb * 1e6),
        max_pixels=int(cfg.max_image_megapixels * 1e6),
        store_side=scale.stored_side(cfg.image_size),
    )
    meter = Meter("checked", len(files), say)
    results: dict[str, ImageCheck] = {}
    for result in pool.map_unordered(check, [f.path for f in files]):
        results[result.path] = result
        meter.update(len(results))
    return results


def downscale(image: Any, size: tuple[int, int], quality: int) -> bytes:
    """An undecoded PIL image scaled down to ``size`` (width, height), as RGB JPEG bytes.

    JPEGs decode at the largest DCT scale still above ``size`` (``draft``), then Lanczos filters
    the rest of the way: the quality of a full decode at a fraction of its cost.
    """
    if image.format in _JPEG_FORMATS:
        image.draft("RGB", size)
    buffer = io.BytesIO()
    to_rgb(image).resize(size, _lanczos()).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _lanczos() -> Any:
    from PIL import Image

    return Image.Resampling.LANCZOS


@dataclass(frozen=True)
class PayloadJob:
    """What a worker process needs to produce one record's bytes."""

    path: str
    reencode: bool
    checked_size: int
    stored_size: tuple[int, int] | None = None  # (width, height) when the image is stored scaled down
    jpeg_quality: int = 90


def payload_job(check: ImageCheck, jpeg_quality: int) -> PayloadJob:
    scaled = (check.width, check.height) if check.source_width else None
    return PayloadJob(check.path, check.reencode, check.file_size, scaled, jpeg_quality)


def record_payload(job: PayloadJob) -> bytes:
    """The bytes stored for one checked image (runs in a worker process)."""
    from PIL import Image

    path, needs_reencode, checked_size = job.path, job.reencode, job.checked_size
    try:
        fh, st = open_regular_file(path)
        with fh:
            if st.st_size != checked_size:
                raise OSError(f"its size is {st.st_size} bytes, {checked_size} when checked")
            data = fh.read(checked_size + 1)
        if len(data) != checked_size:
            raise OSError(f"read {len(data)} bytes, {checked_size} when checked")
        if not needs_reencode:
            return data
        image = Image.open(io.BytesIO(data))
        if job.stored_size is not None:
            return downscale(image, job.stored_size, job.jpeg_quality)
        image.load()
        return reencode(image)[0]
    except TrainerError:
        raise  # SIGTERM (Preempted) while writing in this process says nothing about the file
    except Exception as err:
        raise DataError(f"{path} changed while prepare was running ({err}); run prepare again") from None
