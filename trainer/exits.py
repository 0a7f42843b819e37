"""How every way a command can end becomes one exit code (trainer.contract.ExitCode).

One mapping for the whole program: ``main()`` prints the line and exits with it, and a worker
pushes the same code as its run's outcome. The trainer's own errors carry their code; TensorFlow's
runtime errors and the OS's write errors are classified here; anything else is a bug (exit 1,
with its traceback).
"""

from __future__ import annotations

import errno
import sys

from trainer.contract import ExitCode
from trainer.errors import ConfigError, DataError, Preempted, TrainerError, TransientError, tf_error_summary


def explain(err: BaseException) -> TrainerError | None:
    """The trainer's error ``err`` amounts to (its message is the line to print); None for a bug."""
    if isinstance(err, TrainerError):
        return err
    if isinstance(err, KeyboardInterrupt):
        return Preempted("interrupted (Ctrl-C); the run resumes from its last backup when restarted")
    return classify(err) if isinstance(err, Exception) else None


def exit_code_of(err: BaseException) -> int:
    """The code the process ends with after ``err`` (INTERNAL for a bug)."""
    explained = explain(err)
    return int(explained.exit_code) if explained is not None else int(ExitCode.INTERNAL)


def classify(err: Exception) -> TrainerError | None:
    """Map TensorFlow's runtime errors and the OS's write errors to user errors or transient faults."""
    if isinstance(err, OSError) and err.errno in _OS_WRITE_ERRNOS:
        from trainer import storage

        return storage.local_write_error(err, err.filename or "a file")
    if isinstance(err, RuntimeError) and f"REPLACED BY {Preempted.__name__}" in str(err):
        # SIGTERM's Preempted raised while TensorFlow's C++ layer was translating its own error:
        # pybind11 reports the swap as a RuntimeError. The stop request is what happened.
        return Preempted(
            "received SIGTERM while TensorFlow reported an error; stopping (the run resumes from its last backup)"
        )
    if "tensorflow" not in sys.modules:
        return None
    import tensorflow as tf

    first_line = tf_error_summary(str(err)) or type(err).__name__
    if isinstance(err, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)):
        return TransientError(f"{type(err).__name__}: {first_line} (a peer or the storage is unreachable; retry)")
    if isinstance(err, tf.errors.DataLossError):
        return DataError(f"a dataset file is corrupt ({first_line}); re-run `trainer prepare`")
    if isinstance(err, tf.errors.NotFoundError):
        return DataError(f"a file is missing ({first_line}); check data.dataset and re-run `trainer prepare`")
    # TensorFlow's own writes (checkpoints, TensorBoard, SavedModel) fail as "<path>; <strerror>".
    if isinstance(err, tf.errors.ResourceExhaustedError) and first_line.endswith(_NO_SPACE):
        from trainer import storage

        return storage.local_write_error(OSError(errno.ENOSPC, _NO_SPACE), first_line.removesuffix(_NO_SPACE))
    if isinstance(err, tf.errors.PermissionDeniedError) and first_line.endswith(_READ_ONLY):
        return ConfigError(
            f"cannot write {first_line.removesuffix(_READ_ONLY)}: read-only file system; choose a writable location"
        )
    if isinstance(err, tf.errors.PermissionDeniedError):
        return DataError(f"permission denied ({first_line}); grant access to the dataset and output locations")
    return None


#: OS errors of writes that the trainer's storage layer would have named (scratch files, TF-free writers).
_OS_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_NO_SPACE = "; No space left on device"
_READ_ONLY = "; Read-only file system"
