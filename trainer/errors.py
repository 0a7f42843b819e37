"""Errors that end a command with a one-line message and a documented exit code."""

from __future__ import annotations

import re

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


def tf_error_summary(message: str) -> str:
    """The informative line of a TensorFlow error (not "Graph execution error:" or a traceback)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    noise = ("Graph execution error", "Detected at node", "File ", "[[", "Traceback", "<stack traces unavailable>")
    useful = [line for line in lines if not line.startswith(noise)]
    line = re.sub(r"\s*\[\[.*$|\s*\[Op:.*$", "", (useful or lines or [""])[0])
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)  # which kernel ran it: noise to the user
    line = re.sub(r" with body '.*$", "", line)  # an HTTP error body: long, and says the same
    uri = re.search(r"gs://[^\s'\"]+", message)
    if uri and uri.group(0).rstrip(".,;:") not in line:
        line += f" at {uri.group(0).rstrip('.,;:')}"
    return line
