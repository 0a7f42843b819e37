"""Run state: which phases are complete, persisted so a restarted run carries on.

Written by the chief only, as one small JSON object (a single atomic write on local disk
and on object stores). A restarted worker reads it to skip finished phases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer import storage
from trainer.errors import ConfigError, DataError

STATE_VERSION = 1


@dataclass
class PhaseResult:
    epochs_run: int
    best_epoch: int | None
    best_value: float | None  # train.monitor at the best epoch
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: list[float] | None = None  # callbacks.score() of the best epoch: the next phase's baseline
    feature_cache: str | None = None  # the cut a feature cache trained above (trainer.train.feature_cache), if any


@dataclass
class RunState:
    class_names: list[str]
    phases: dict[str, PhaseResult] = field(default_factory=dict)  # completed phases, in order
    complete: bool = False
    version: int = STATE_VERSION
    settings: dict[str, Any] = field(default_factory=dict)  # the configuration the run started with

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
                settings=dict(raw.get("settings") or {}),
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


#: Settings a backup cannot survive: they change the model's shape or what its weights mean.
#: Classes are checked by load_state. Everything else may change on a resume and is logged.
BINDING_SETTINGS = ("data.image_size", "model.head", "model.weights")
#: Settings that name where things are rather than what is trained: a change is not worth a line.
PLACES = ("output.dir",)


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, current value) for every setting that differs; a binding one as a whole."""
    changes = []

    def walk(old: Any, new: Any, key: str) -> None:
        if key in BINDING_SETTINGS or not (isinstance(old, dict) and isinstance(new, dict)):
            if old != new and key not in PLACES:
                changes.append((key, old, new))
            return
        for name in sorted(set(old) | set(new)):
            walk(old.get(name), new.get(name), f"{key}.{name}" if key else name)

    walk(recorded, current, "")
    return changes


def check_resume(state: RunState, settings: dict[str, Any], root: str) -> list[str]:
    """Refuse a resume whose settings invalidate what the run trained; the safe changes, as lines to log."""
    changes = changed_settings(state.settings, settings) if state.settings else []
    for key, old, new in changes:
        if key in BINDING_SETTINGS:
            raise ConfigError(
                f"the run in {root} was started with {key}={_shown(old)} and cannot resume with {_shown(new)} "
                f"(its backup and weights are for the old value); resume with --set {key}={_shown(old)}, "
                "or use a new output.dir to start over"
            )
    return [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in changes]


def _shown(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict | list) else str(value)


def save_state(path: str, state: RunState) -> None:
    storage.write_text(path, state.to_json())
