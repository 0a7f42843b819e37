"""The output location of `trainer prepare`: refused early when unsafe or unwritable, and write errors explained.

A local dataset directory that cannot be written fails before a single image is checked; an
output inside the source (it would be read back as a class) or over an existing dataset
(without ``--overwrite``) is refused. The classifiers here tell a full disk and a read-only or
forbidden location apart from other errors, whichever layer (the OS, TensorFlow's writer) raised.
"""

from __future__ import annotations

import errno
import os
import sys

from trainer import storage
from trainer.contract import MANIFEST_FILE, PREPARE_REPORT_FILE
from trainer.data.manifest import manifest_path
from trainer.errors import ConfigError


def refuse_unsafe_output(source: str, output: str, overwrite: bool) -> None:
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


def require_writable_output(output: str) -> None:
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


def remove_previous_dataset(output: str) -> None:
    """Delete an old manifest first (so the dataset reads as unfinished), then its report.

    Shards are left to the ShardSink: it keeps those an interrupted run completed (when
    their contents would be the same) and deletes the rest.
    """
    storage.remove_tree(manifest_path(output))
    storage.remove_tree(storage.join(output, PREPARE_REPORT_FILE))


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    tf = sys.modules.get("tensorflow")  # TFRecordWriter reports ENOSPC as ResourceExhaustedError
    return tf is not None and isinstance(err, tf.errors.ResourceExhaustedError) and "space" in str(err).lower()


def is_not_writable(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    tf = sys.modules.get("tensorflow")  # TFRecordWriter reports EROFS and EACCES as PermissionDeniedError
    return tf is not None and isinstance(err, tf.errors.PermissionDeniedError)


def error_text(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return getattr(err, "message", "") or type(err).__name__
