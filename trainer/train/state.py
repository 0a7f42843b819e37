"""Run state: which phases are complete, persisted so a restarted run carries on.

Written by the chief only, as one small JSON object (a single atomic write on local disk
and on object stores). A restarted worker reads it to skip finished phases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer import storage
from trainer.errors import DataError

STATE_VERSION = 1


@dataclass
class PhaseResult:
    epochs_run: int
    best_epoch: int | None
    best_value: float | None  # train.monitor at the best epoch
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: list[float] | None = None  # callbacks.score() of the best epoch: the next phase's baseline


@dataclass
class RunState:
    class_names: list[str]
    phases: dict[str, PhaseResult] = field(default_factory=dict)  # completed phases, in order
    complete: bool = False
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> RunState:
        try:
            raw = json.loads(text)
            return cls(
                class_names=list(raw["class_names"]),
                phases={name: PhaseResult(**result) for name, result in raw.get("phases", {}).items()},
                complete=bool(raw.get("complete", False)),
                version=int(raw.get("version", STATE_VERSION)),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{where}: run state is unreadable ({err!r}); delete it to start over or use a new output.dir"
            ) from None


def load_state(path: str, class_names: list[str]) -> RunState:
    """The saved state, or a fresh one; refuses a backup made for other classes."""
    if not storage.exists(path):
        return RunState(class_names=list(class_names))
    state = RunState.from_json(storage.read_text(path), path)
    if state.class_names != list(class_names):
        raise DataError(
            f"the backup in {path.rsplit('/', 1)[0]} was made for classes {state.class_names} but the dataset has "
            f"{list(class_names)}; use a new output.dir (or delete the old run) to train on this dataset"
        )
    return state


def save_state(path: str, state: RunState) -> None:
    storage.write_text(path, state.to_json())
