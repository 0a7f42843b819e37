"""Where a run keeps its files inside ``output.dir`` (local path or gs:// prefix)."""

from __future__ import annotations

from dataclasses import dataclass

from trainer import storage
from trainer.contract import LABELS_FILE, METRICS_LOG_FILE, RUN_ATTEMPTS_FILE, RUN_CURVES_FILE, RUN_SUMMARY_FILE


@dataclass(frozen=True)
class RunLayout:
    root: str

    def backup(self, phase: str) -> str:
        """Resumable mid-phase backups (deleted when the phase completes)."""
        return storage.join(self.root, "backup", phase)

    def best_weights(self, phase: str) -> str:
        return storage.join(self.root, "best", f"{phase}.weights.h5")

    def best_record(self, phase: str) -> str:
        return storage.join(self.root, "best", f"{phase}.json")

    def phase_weights(self, phase: str) -> str:
        """Weights at the end of a completed phase: where a restarted run picks up."""
        return storage.join(self.root, "phases", f"{phase}.weights.h5")

    @property
    def state(self) -> str:
        return storage.join(self.root, "state.json")

    @property
    def tensorboard(self) -> str:
        return storage.join(self.root, "logs")

    @property
    def metrics_log(self) -> str:
        return storage.join(self.root, METRICS_LOG_FILE)

    @property
    def export(self) -> str:
        return storage.join(self.root, "export")

    @property
    def saved_model(self) -> str:
        return storage.join(self.export, "saved_model")

    @property
    def keras_model(self) -> str:
        return storage.join(self.export, "model.keras")

    @property
    def labels(self) -> str:
        return storage.join(self.export, LABELS_FILE)

    def evaluation(self, split: str) -> str:
        """The evaluation report of the export on ``split`` (trainer.report)."""
        return storage.join(self.root, "evaluation", split)

    def evaluation_part(self, split: str, worker_index: int) -> str:
        """One worker's predictions on its share of ``split``, until the chief has joined them."""
        return storage.join(self.evaluation(split), f"predictions-worker-{worker_index}.npz")

    @property
    def summary(self) -> str:
        return storage.join(self.root, RUN_SUMMARY_FILE)

    @property
    def curves(self) -> str:
        """The chief's PNG of the training curves (loss, accuracy, throughput)."""
        return storage.join(self.root, RUN_CURVES_FILE)

    @property
    def attempts(self) -> str:
        """How often the run was started: trainer_group_restarts is this minus one."""
        return storage.join(self.root, RUN_ATTEMPTS_FILE)
