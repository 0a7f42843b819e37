"""Errors that end a command with a one-line message and a documented exit code."""

from __future__ import annotations

from trainer.contract import ExitCode


class TrainerError(Exception):
    """Base class: carries the exit code the process should end with.

    The message must name the problem and the fix in one line.
    """

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(TrainerError):
    """The configuration or command line is wrong. Not worth retrying."""

    exit_code = ExitCode.CONFIG_ERROR


class DataError(TrainerError):
    """The dataset, a manifest, a weights file or a backup is unusable. Not worth retrying."""

    exit_code = ExitCode.DATA_ERROR


class TransientError(TrainerError):
    """A fault that may go away on retry (network, storage, a peer not yet up)."""

    exit_code = ExitCode.TRANSIENT


class Preempted(TrainerError):
    """The process was asked to stop (SIGTERM) and saved its state first."""

    exit_code = ExitCode.PREEMPTED
