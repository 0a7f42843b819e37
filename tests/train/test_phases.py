"""trainer.train.phases, .callbacks, .state and .layout: schedules, optimizers, plans, run state, paths."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from trainer.config import PHASE_NAMES, Config, PhaseConfig, load_config
from trainer.errors import DataError, Preempted
from trainer.layout import RunLayout
from trainer.train.callbacks import current_learning_rate, score
from trainer.train.phases import WarmupSchedule, make_optimizer, plan_phase
from trainer.train.state import PhaseResult, RunState, load_state, save_state


def lr_at(schedule: WarmupSchedule, step: int) -> float:
    return float(schedule(step))


# --------------------------------------------------------------------------- WarmupSchedule


def test_constant_schedule_without_warmup_is_the_peak_everywhere():
    schedule = WarmupSchedule(peak=0.1, total_steps=100)

    assert [lr_at(schedule, s) for s in (0, 50, 99, 500)] == pytest.approx([0.1] * 4)


def test_warmup_ramps_linearly_to_the_peak_then_stays_constant():
    schedule = WarmupSchedule(peak=0.1, total_steps=100, warmup_steps=10)

    assert lr_at(schedule, 0) == pytest.approx(0.01)  # the first step already learns a little
    assert lr_at(schedule, 4) == pytest.approx(0.05)
    assert lr_at(schedule, 9) == pytest.approx(0.1)
    assert lr_at(schedule, 10) == pytest.approx(0.1)
    assert lr_at(schedule, 99) == pytest.approx(0.1)


def test_cosine_decays_from_the_peak_to_zero_after_warmup():
    schedule = WarmupSchedule(peak=0.1, total_steps=110, warmup_steps=10, decay="cosine")

    assert lr_at(schedule, 4) == pytest.approx(0.05)  # still warming up
    assert lr_at(schedule, 10) == pytest.approx(0.1)  # decay starts at the peak
    assert lr_at(schedule, 60) == pytest.approx(0.05)  # half-way: half the peak
    assert lr_at(schedule, 110) == pytest.approx(0.0, abs=1e-9)
    assert lr_at(schedule, 1000) == pytest.approx(0.0, abs=1e-9)  # clipped, never negative or rising
    values = [lr_at(schedule, s) for s in range(10, 111, 10)]
    assert values == sorted(values, reverse=True)


def test_cosine_without_warmup_starts_at_the_peak():
    schedule = WarmupSchedule(peak=0.2, total_steps=4, decay="cosine")

    assert [lr_at(schedule, s) for s in range(5)] == pytest.approx(
        [0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)], abs=1e-7
    )


def test_schedule_config_round_trips():
    schedule = WarmupSchedule(peak=0.1, total_steps=50, warmup_steps=5, decay="cosine")

    clone = WarmupSchedule(**schedule.get_config())

    assert [lr_at(clone, s) for s in (0, 5, 30)] == [lr_at(schedule, s) for s in (0, 5, 30)]


# --------------------------------------------------------------------------- optimizers and plans


def phase(**overrides) -> PhaseConfig:
    items = [f"phases.fine_tuning.{key}={value}" for key, value in overrides.items()]
    return load_config(overrides=items).phases["fine_tuning"]


@pytest.mark.parametrize(
    ("name", "cls", "momentum"),
    [
        ("sgd", keras.optimizers.SGD, 0.8),
        ("rmsprop", keras.optimizers.RMSprop, 0.5),
        ("adam", keras.optimizers.Adam, None),
    ],
)
def test_make_optimizer_picks_the_class_and_momentum(name, cls, momentum):
    cfg = phase(**{"optimizer.name": name, "optimizer.momentum": momentum or 0.9, "epochs": 2})

    optimizer = make_optimizer(cfg, learning_rate=0.05, steps_per_epoch=10)

    assert type(optimizer) is cls
    if momentum is not None:
        assert optimizer.momentum == pytest.approx(momentum)
    assert current_learning_rate(optimizer) == pytest.approx(0.05)


def test_make_optimizer_schedule_follows_the_phase_schedule():
    cfg = phase(**{"epochs": 3, "schedule.name": "cosine", "schedule.warmup_epochs": 0.5})
    optimizer = make_optimizer(cfg, learning_rate=0.01, steps_per_epoch=20)  # 60 steps, 10 of warm-up
    weight = tf.Variable(1.0)
    used = []  # the learning rate of each step, as the metrics log reports it
    for _ in range(60):
        optimizer.apply_gradients([(tf.constant(0.0), weight)])
        used.append(current_learning_rate(optimizer))

    assert used[0] == pytest.approx(0.001)  # warm-up: 1/10 of the peak
    assert used[9] == pytest.approx(0.01)  # peak at the end of the warm-up
    assert used[35] == pytest.approx(0.005)  # half-way through the cosine
    assert used[59] == pytest.approx(0.0, abs=2e-5)  # the phase ends near zero
    assert used[10:] == sorted(used[10:], reverse=True)


def test_make_optimizer_passes_clipnorm_and_weight_decay_only_when_set():
    plain = make_optimizer(phase(), 0.01, 10)
    clipped = make_optimizer(phase(**{"optimizer.clipnorm": 1.0, "optimizer.weight_decay": 0.0001}), 0.01, 10)

    assert plain.clipnorm is None and plain.weight_decay is None
    assert clipped.clipnorm == 1.0
    assert clipped.weight_decay == pytest.approx(0.0001)


def test_plan_phase_scales_the_learning_rate_linearly_to_the_global_batch():
    cfg = load_config(overrides=["train.reference_batch_size=32", "train.validation_steps=3"])

    plan = plan_phase("fine_tuning", cfg, steps_per_epoch=25, global_batch=128, first_step=100)

    assert plan.learning_rate == pytest.approx(1e-4 * 4)
    assert plan.config is cfg.phases["fine_tuning"]
    assert (plan.name, plan.steps_per_epoch, plan.global_batch, plan.first_global_step) == ("fine_tuning", 25, 128, 100)
    assert plan.validation_steps == 3


def test_plan_phase_without_scaling_and_with_the_whole_validation_split():
    cfg = load_config(overrides=["train.lr_scaling=none"])

    plan = plan_phase("feature_extraction", cfg, steps_per_epoch=10, global_batch=256, first_step=0)

    assert plan.learning_rate == pytest.approx(1e-3)
    assert plan.validation_steps is None  # 0 in the config = the whole split


def test_phases_are_keyed_by_name_in_the_order_they_run():
    assert PHASE_NAMES == ("feature_extraction", "fine_tuning")
    assert list(Config().phases) == list(PHASE_NAMES)
    assert all(isinstance(phase, PhaseConfig) for phase in Config().phases.values())
    # Given in another order, or only in part, the phases still run in their order with their defaults.
    given = Config(phases={"fine_tuning": PhaseConfig(epochs=1)})
    assert list(given.phases) == list(PHASE_NAMES)
    assert given.phases["feature_extraction"] == Config().phases["feature_extraction"]


# --------------------------------------------------------------------------- callbacks


@pytest.mark.parametrize(
    ("monitor", "logs", "expected"),
    [
        ("val_loss", {"val_loss": 0.4}, (-0.4, 0.0)),  # losses count negated: higher is better
        ("val_accuracy", {"val_accuracy": 0.9, "val_loss": 0.3}, (0.9, -0.3)),
        ("accuracy", {"accuracy": 0.8}, (0.8, 0.0)),  # no matching loss: no tie-break
        ("val_accuracy", {"val_accuracy": float("nan")}, None),  # a diverged epoch is never "best"
        ("val_accuracy", {"loss": 0.3}, None),  # not measured
    ],
)
def test_score(monitor, logs, expected):
    assert score(monitor, logs) == expected


def test_score_orders_epochs_as_a_person_would():
    def better(a: dict, b: dict, monitor="val_accuracy") -> bool:
        return score(monitor, a) > score(monitor, b)

    assert better({"val_accuracy": 0.9, "val_loss": 0.5}, {"val_accuracy": 0.8, "val_loss": 0.1})
    # Saturated accuracy: the lower loss (a more confident model) breaks the tie.
    assert better({"val_accuracy": 1.0, "val_loss": 0.2}, {"val_accuracy": 1.0, "val_loss": 0.9})
    assert not better({"val_accuracy": 1.0, "val_loss": 0.9}, {"val_accuracy": 1.0, "val_loss": 0.9})
    assert better({"val_loss": 0.3}, {"val_loss": 0.4}, monitor="val_loss")


# --------------------------------------------------------------------------- run state


def finished_state() -> RunState:
    result = PhaseResult(
        epochs_run=2,
        best_epoch=2,
        best_value=0.75,
        seconds=12.5,
        history=[{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75}],
    )
    return RunState(class_names=["cat", "dog"], phases={"feature_extraction": result}, complete=False)


def test_run_state_json_round_trip():
    state = finished_state()

    assert RunState.from_json(state.to_json(), "state.json") == state
    assert json.loads(state.to_json())["phases"]["feature_extraction"]["best_value"] == 0.75


def test_load_state_without_a_file_is_a_fresh_state(tmp_path):
    state = load_state(str(tmp_path / "state.json"), ("cat", "dog"))

    assert state == RunState(class_names=["cat", "dog"])


def test_save_then_load_state(tmp_path):
    path = str(tmp_path / "run" / "state.json")
    save_state(path, finished_state())

    assert load_state(path, ["cat", "dog"]) == finished_state()


def test_load_state_for_other_classes_is_a_one_line_data_error(tmp_path):
    path = str(tmp_path / "state.json")
    save_state(path, finished_state())

    with pytest.raises(DataError) as info:
        load_state(path, ["cat", "dog", "fox"])

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the backup in {tmp_path} was made for classes ['cat', 'dog'] but the dataset has")
    assert "use a new output.dir" in message


@pytest.mark.parametrize(
    "text",
    ["{broken", '{"phases": {}}', '{"class_names": ["a"], "phases": {"x": {"epochs": 1}}}'],
)
def test_unreadable_run_state_is_a_one_line_data_error(text):
    with pytest.raises(DataError, match=r"^out/state\.json: run state is unreadable \(.*\); delete it") as info:
        RunState.from_json(text, "out/state.json")

    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- layout


def test_run_layout_paths_locally():
    layout = RunLayout("/runs/7")

    assert layout.backup("fine_tuning") == "/runs/7/backup/fine_tuning"
    assert layout.best_weights("fine_tuning") == "/runs/7/best/fine_tuning.weights.h5"
    assert layout.best_record("fine_tuning") == "/runs/7/best/fine_tuning.json"
    assert layout.phase_weights("feature_extraction") == "/runs/7/phases/feature_extraction.weights.h5"
    assert layout.state == "/runs/7/state.json"
    assert layout.tensorboard == "/runs/7/logs"
    assert layout.metrics_log == "/runs/7/metrics.jsonl"
    assert layout.saved_model == "/runs/7/export/saved_model"
    assert layout.keras_model == "/runs/7/export/model.keras"
    assert layout.labels == "/runs/7/export/labels.txt"
    assert layout.summary == "/runs/7/summary.json"


def test_run_layout_paths_on_an_object_store():
    layout = RunLayout("gs://bucket/runs/7/")

    assert layout.state == "gs://bucket/runs/7/state.json"
    assert layout.saved_model == "gs://bucket/runs/7/export/saved_model"


# --------------------------------------------------------------------------- backups


def test_backups_keep_the_last_k_complete_checkpoints(tmp_path):
    from trainer.train.backup import PhaseBackup
    from trainer.train.callbacks import Backups

    model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    model.compile("sgd", "mse")
    x, y = np.zeros((10, 3), "float32"), np.zeros((10, 2), "float32")
    backups = Backups(PhaseBackup(str(tmp_path / "backup"), model, keep=2, is_chief=True), 1, steps_per_epoch=5)

    model.fit(x, y, batch_size=2, epochs=1, callbacks=[backups], verbose=0)

    chief = tmp_path / "backup" / "chief"
    assert sorted(p.name for p in chief.glob("ckpt-*.index")) == ["ckpt-4.index", "ckpt-5.index"]
    # The commit marker names the newest backup; an unfinished one would never be named.
    assert 'model_checkpoint_path: "ckpt-5"' in (chief / "checkpoint").read_text()


def test_a_backup_restores_weights_optimizer_state_and_position(tmp_path):
    from trainer.train.backup import PhaseBackup, Position

    def model_and_data(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
        model.compile(keras.optimizers.Adam(0.1), "mse")
        return model, np.ones((4, 3), "float32"), np.ones((4, 2), "float32")

    model, x, y = model_and_data(0)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    PhaseBackup(str(tmp_path), model, keep=1, is_chief=True).save(Position(epoch=3, steps_done=1, phase_steps=7))

    restored, _, _ = model_and_data(1)  # other random weights, an optimizer that has not stepped
    position = PhaseBackup(str(tmp_path), restored, keep=1, is_chief=True).restore()

    assert position == Position(epoch=3, steps_done=1, phase_steps=7)
    for a, b in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Adam's moments and step count come back too (filled in when the first step creates them):
    # one more step from the restored state equals one more step of the original.
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    restored.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert int(restored.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 3
    for a, b in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_no_backup_restores_nothing(tmp_path):
    from trainer.train.backup import PhaseBackup

    model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    model.compile("sgd", "mse")

    assert PhaseBackup(str(tmp_path / "none"), model, keep=1, is_chief=True).restore() is None


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (None, [(0, 3, 4, 0)]),  # a fresh phase: one fit of every epoch
        ((1, 4, 8), [(2, 3, 4, 0)]),  # backed up at epoch 2's end: epoch 3 next
        ((1, 1, 5), [(1, 2, 3, 1), (2, 3, 4, 0)]),  # mid-epoch: the rest of epoch 2, then epoch 3
        ((1, 6, 10), [(2, 3, 4, 0)]),  # a longer epoch before a rescale: that epoch is done
        ((2, 4, 12), []),  # the last epoch ended: nothing left
    ],
)
def test_a_resumed_phase_runs_exactly_the_steps_its_backup_had_not(position, expected):
    from trainer.train.backup import Position, segments

    restored = Position(*position) if position is not None else None

    planned = [(s.initial_epoch, s.end_epoch, s.steps, s.skipped) for s in segments(restored, 3, 4)]

    assert planned == expected


class _EpochEnds(keras.callbacks.Callback):
    """Records the epochs whose end ran; sends this process SIGTERM after one chosen step."""

    def __init__(self, sigterm_after: tuple[int, int] | None = None):
        super().__init__()
        self.sigterm_after = sigterm_after
        self.ended: list[int] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_end(self, epoch, logs=None):
        self.ended.append(epoch)


def _fit_with_backups(tmp_path, watcher: _EpochEnds) -> None:
    """A phase of 3 epochs x 4 steps with a backup every 4 steps, resumed from its backup if it has one."""
    from trainer.train.backup import PhaseBackup
    from trainer.train.callbacks import Backups, StopRequest
    from trainer.train.phases import fit_from_position

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensors((np.zeros((2, 3), "float32"), np.zeros((2, 2), "float32"))).repeat()
    stop = StopRequest(tf.distribute.get_strategy(), multi_worker=False)
    backup = PhaseBackup(str(tmp_path / "backup"), model, keep=2, is_chief=True)
    position = backup.restore()
    backups = Backups(backup, 4, 4, position.phase_steps if position else 0, stop)
    stop.install()
    try:
        fit_from_position(model, data, 3, 4, position, [watcher, backups], backups)
    finally:
        stop.uninstall()


@pytest.mark.parametrize(("step", "resumes_at_epoch"), [(1, 1), (3, 2)])
def test_sigterm_backs_up_then_stops_and_a_restart_never_skips_an_epoch_end(tmp_path, step, resumes_at_epoch):
    first = _EpochEnds(sigterm_after=(1, step))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted):
        _fit_with_backups(tmp_path, first)
    # SIGTERM after the last step of epoch 1 (step 3) still lets that epoch end (validation,
    # best model, metrics log) before the backup; mid-epoch it stops at once.
    assert first.ended == ([0, 1] if step == 3 else [0])
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back

    second = _EpochEnds()
    _fit_with_backups(tmp_path, second)
    assert second.ended == list(range(resumes_at_epoch, 3))


# --------------------------------------------------------------------------- stop checks


def _steps(stop, count: int, seconds: float) -> list[int]:
    """Run ``count`` steps of ``seconds`` each; the steps after which the stop check ran."""
    checked = []
    for step in range(1, count + 1):
        interval = stop.interval_steps
        before = stop._since_check
        time.sleep(seconds)
        stop.agreed_after_step()
        if before + 1 >= interval:
            checked.append(step)
    return checked


def test_stop_checks_come_every_n_steps_when_steps_are_fast():
    from trainer.train.callbacks import StopRequest

    # A one-replica strategy runs the same all-reduce code path as a multi-worker run.
    stop = StopRequest(tf.distribute.get_strategy(), multi_worker=True, every_steps=4, every_seconds=30.0)

    checked = _steps(stop, 9, 0.001)

    assert checked == [1, 5, 9]  # the first after step 1, then every 4 steps (the step bound)


def test_slow_steps_bring_the_stop_checks_closer_in_steps_to_keep_the_seconds_bound():
    from trainer.train.callbacks import StopRequest

    stop = StopRequest(tf.distribute.get_strategy(), multi_worker=True, every_steps=100, every_seconds=0.5)

    checked = _steps(stop, 8, 0.2)  # 0.2 s steps, 0.5 s bound: a check every 2 steps

    assert stop.interval_steps == 2
    assert checked == [1, 3, 5, 7]
    gaps = np.diff(checked) * 0.2
    assert gaps.max() <= 0.5


def test_a_step_slower_than_the_bound_is_followed_by_a_check_every_step():
    from trainer.train.callbacks import StopRequest

    stop = StopRequest(tf.distribute.get_strategy(), multi_worker=True, every_steps=10, every_seconds=0.05)

    assert _steps(stop, 4, 0.1) == [1, 2, 3, 4]
    assert stop.interval_steps == 1


def test_a_sigterm_is_agreed_at_the_next_check():
    from trainer.train.callbacks import StopRequest

    stop = StopRequest(tf.distribute.get_strategy(), multi_worker=True, every_steps=3, every_seconds=60.0)
    stop.install()
    try:
        assert not stop.agreed_after_step()  # step 1: the first check; nobody was signalled
        os.kill(os.getpid(), signal.SIGTERM)
        assert [stop.agreed_after_step() for _ in range(3)] == [False, False, True]  # steps 2-4: next check at 4
    finally:
        stop.uninstall()


# --------------------------------------------------------------------------- early stopping


class _Scores(keras.callbacks.Callback):
    """Feeds KeepBest a fixed val_accuracy per epoch (tests the decision, not the model)."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"], logs["val_loss"] = self.values[epoch], 1.0


def _fit_with_early_stopping(tmp_path, values, patience, baseline=None, initial_epoch=0):
    from trainer.train.callbacks import EarlyStopping, KeepBest

    tmp_path.mkdir(exist_ok=True)
    model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    model.compile("sgd", "mse")
    keep_best = KeepBest(
        "val_accuracy", str(tmp_path / "best.h5"), str(tmp_path / "best.json"), True,
        lambda m, path: m.save_weights(path), baseline,
    )  # fmt: skip
    keep_best.start(model, lambda m, path: m.load_weights(path))
    early = EarlyStopping(keep_best, patience)
    x, y = np.zeros((4, 3), "float32"), np.zeros((4, 2), "float32")
    history = model.fit(
        x, y, batch_size=2, epochs=len(values), initial_epoch=initial_epoch, verbose=0,
        callbacks=[_Scores(values), keep_best, early],
    )  # fmt: skip
    keep_best.finish()
    return early, keep_best, len(history.epoch)


def test_early_stopping_counts_patience_from_the_best_epoch(tmp_path):
    early, keep_best, _ = _fit_with_early_stopping(tmp_path, [0.5, 0.7, 0.6, 0.6, 0.9], patience=2)

    assert (keep_best.best_epoch, early.stopped_epoch) == (2, 4)


def test_a_phase_that_never_beats_the_previous_best_stops_after_patience_epochs(tmp_path):
    early, keep_best, _ = _fit_with_early_stopping(tmp_path, [0.5, 0.5, 0.5, 0.5], patience=2, baseline=(0.8, 0.0))

    assert keep_best.best_epoch is None and early.stopped_epoch == 2


def test_early_stopping_after_a_restart_stops_where_the_uninterrupted_phase_stopped(tmp_path):
    values = [0.5, 0.7, 0.6, 0.6, 0.6, 0.9]
    uninterrupted, _, _ = _fit_with_early_stopping(tmp_path / "a", values, patience=3)
    # The interrupted phase ran epochs 1-3 (best: epoch 2, in KeepBest's record), then resumes at epoch 4.
    _fit_with_early_stopping(tmp_path / "b", values[:3], patience=3)
    resumed, keep_best, ran = _fit_with_early_stopping(tmp_path / "b", values, patience=3, initial_epoch=3)

    assert keep_best.best_epoch == 2
    assert resumed.stopped_epoch == uninterrupted.stopped_epoch == 5
    assert ran == 2  # epochs 4 and 5 after the restart
