"""File access for local paths and object-store URIs.

- local paths: the standard library (writes are atomic: temporary file + rename, with the
  mode the umask gives, 0644 under the usual 022, as TensorFlow's own files: a dataset or
  run written by one user is readable by another, e.g. the container's user 10001);
- ``gs://``: google-cloud-storage (:mod:`trainer.gcs`), with retries and clear errors;
- other URIs (``s3://``, ``hdfs://`` ... where TensorFlow supports them): ``tf.io.gfile``.

Local write failures the user can fix become the trainer's errors, naming the path: a
parent that is a file, no permission or a read-only file system (ConfigError), a full disk
(TransientError).

TensorFlow is imported only when needed, so light commands stay fast.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil


def is_remote(path: str) -> bool:
    return "://" in path


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    if is_gcs(path):
        from trainer import gcs

        return gcs.exists(path)
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        from trainer import gcs

        return gcs.read_bytes(path)
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
    """Write a whole file; atomic locally (temp file + rename) and on GCS (one object)."""
    if is_gcs(path):
        from trainer import gcs

        gcs.write_bytes(path, data)
        return
    if is_remote(path):
        with _gfile().GFile(path, "wb") as fh:
            fh.write(data)
        return
    try:
        _write_local(path, data)
    except OSError as err:
        raise local_write_error(err, path) from None


def _write_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _create_temporary(directory: str) -> tuple[int, str]:
    """A new file beside the target, mode 0666 less the umask (mkstemp's 0600 would hide it from other users)."""
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # 64 random bits taken: try another name
            continue


#: errno -> (what it means, the fix) for local writes.
_WRITE_ERRORS = {
    errno.EACCES: ("permission denied", "choose a writable location or fix its permissions"),
    errno.EPERM: ("permission denied", "choose a writable location or fix its permissions"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EISDIR: ("it is a directory", "choose a file path"),
}
#: A full disk or quota is a fault of the moment, not of the input: space is freed (old backups,
#: other jobs), the volume grows, or the retried pod gets an empty scratch volume. So it is
#: TRANSIENT (retried, and the run resumes from its last backup), not a user error that fails the Job.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def local_write_error(err: OSError, path: str) -> Exception:
    """The trainer's error for a failed local write under ``path`` (``err`` itself when unknown)."""
    from trainer.errors import ConfigError, TransientError

    if err.errno in _FULL:
        return TransientError(
            f"cannot write {path}: no space left on the device; free space or enlarge the volume "
            "(retrying resumes from the last backup)"
        )
    if err.errno in (errno.EEXIST, errno.ENOTDIR):  # makedirs met a file where a directory must be
        blocker = file_in_the_way(path)
        if blocker is not None:
            return ConfigError(f"cannot write {path}: {blocker} is a file, not a directory; choose another path")
    if err.errno in _WRITE_ERRORS:
        problem, fix = _WRITE_ERRORS[err.errno]
        return ConfigError(f"cannot write {path}: {problem}; {fix}")
    return err


def file_in_the_way(path: str) -> str | None:
    """The first of ``path`` and its parents that exists and is not a directory (local paths)."""
    current = os.path.abspath(path)
    while True:
        if os.path.lexists(current):
            return None if os.path.isdir(current) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    if is_gcs(path):
        return  # object stores have no directories
    if is_remote(path):
        _gfile().makedirs(path)
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise local_write_error(err, path) from None


def glob(pattern: str) -> list[str]:
    if is_gcs(pattern):
        import fnmatch

        from trainer import gcs

        prefix = pattern.split("*", 1)[0]
        return sorted(uri for uri in gcs.list_names(prefix) if fnmatch.fnmatchcase(uri, pattern))
    if is_remote(pattern):
        return sorted(_gfile().glob(pattern))
    import glob as _glob

    return sorted(_glob.glob(pattern))


def size(path: str) -> int:
    if is_gcs(path):
        from trainer import gcs

        return gcs.size(path)
    return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


def sizes(directory: str, paths: list[str]) -> dict[str, int]:
    """Sizes of those ``paths`` (under ``directory``) that exist: one listing on gs://, a stat each elsewhere."""
    if is_gcs(directory):
        from trainer import gcs

        listed = gcs.list_sizes(directory.rstrip("/") + "/")
        return {path: listed[path] for path in paths if path in listed}
    found = {}
    for path in paths:
        if is_remote(path):
            if _gfile().exists(path):
                found[path] = size(path)
            continue
        try:
            found[path] = os.path.getsize(path)
        except OSError:
            continue
    return found


def remove_tree(path: str) -> None:
    """Remove a file or a directory (for URIs: the object and everything under the prefix)."""
    if is_gcs(path):
        from trainer import gcs

        gcs.delete_prefix(path)
    elif is_remote(path):
        if _gfile().exists(path):
            _gfile().rmtree(path) if _gfile().isdir(path) else _gfile().remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def copy(src: str, dst: str) -> None:
    """Copy one file; local -> gs:// uploads, gs:// -> local downloads."""
    if is_gcs(dst) and not is_remote(src):
        from trainer import gcs

        gcs.upload_file(src, dst)
    elif is_gcs(src) and not is_remote(dst):
        from trainer import gcs

        gcs.download_file(src, dst)
    elif is_remote(src) or is_remote(dst):
        _gfile().copy(src, dst, overwrite=True)
    else:
        shutil.copyfile(src, dst)


def copy_verified(src: str, local_path: str, expected_size: int) -> None:
    """Copy ``src`` to a local file, verified: crc32c on gs://, size everywhere; atomic rename."""
    if is_gcs(src):
        from trainer import gcs

        gcs.download_file(src, local_path, expected_size)
        return
    tmp = f"{local_path}.partial"
    copy(src, tmp)
    got = os.path.getsize(tmp)
    if got != expected_size:
        os.remove(tmp)
        from trainer.errors import DataError

        raise DataError(f"{src} has {got} bytes, the manifest says {expected_size}; re-run `trainer prepare`")
    os.replace(tmp, local_path)


def upload_tree(local_dir: str, dst: str) -> None:
    """Copy a local directory tree to ``dst`` (replacing what was there)."""
    remove_tree(dst)
    if not is_remote(dst):
        shutil.copytree(local_dir, dst)
        return
    for directory, _, files in os.walk(local_dir):
        rel = os.path.relpath(directory, local_dir)
        target = dst if rel == "." else join(dst, *rel.split(os.sep))
        makedirs(target)
        for name in files:
            copy(os.path.join(directory, name), join(target, name))
