"""File access for local paths and object-store URIs (gs://...).

Local paths use the standard library; URIs go through TensorFlow's filesystem layer
(``tf.io.gfile``), imported only when needed so light commands stay fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile


def is_remote(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        gfile = _gfile()
        if not gfile.exists(path):
            raise FileNotFoundError(path)
        with gfile.GFile(path, "rb") as fh:
            return fh.read()
    with open(path, "rb") as fh:
        return fh.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file; local writes are atomic (temp file + rename)."""
    if is_remote(path):
        with _gfile().GFile(path, "wb") as fh:  # one object upload: atomic on GCS
            fh.write(data)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        return sorted(_gfile().glob(pattern))
    import glob as _glob

    return sorted(_glob.glob(pattern))


def size(path: str) -> int:
    return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


def remove_tree(path: str) -> None:
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def copy(src: str, dst: str) -> None:
    if is_remote(src) or is_remote(dst):
        _gfile().copy(src, dst, overwrite=True)
    else:
        shutil.copyfile(src, dst)
