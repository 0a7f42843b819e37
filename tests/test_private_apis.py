"""Every private API in trainer/private_apis.py still exists on the installed versions.

An upgrade of TensorFlow, tf-keras or google-cloud-storage that moves one fails here, naming it,
instead of somewhere inside a training run.
"""

from __future__ import annotations

import importlib

import pytest

from trainer import private_apis

#: Attributes set on instances (in __init__ or by tf.Module tracking), checked on a live object.
INSTANCE_ATTRIBUTES = {
    "tensorflow.python.checkpoint.checkpoint_management.CheckpointManager._max_to_keep",
    "tf_keras.src.distribute.worker_training_state.WorkerTrainingState._ckpt_saved_epoch",
    "tf_keras.src.distribute.worker_training_state.WorkerTrainingState._ckpt_saved_batch",
    "tf_keras.Model._train_counter",
    "google.cloud.storage.Client._credentials",
}


def _owner(name: str):
    """The module or class named by all but the last part of ``name``."""
    parts = name.split(".")[:-1]
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ImportError(name)


@pytest.mark.parametrize("name", sorted(private_apis.PRIVATE_APIS))
def test_each_private_api_is_still_there(name):
    try:
        owner = _owner(name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"private API {name} moved in this version ({err}); update trainer/private_apis.py")
    attribute = name.rsplit(".", 1)[1]
    if name in INSTANCE_ATTRIBUTES:
        return  # resolved on live objects below
    assert hasattr(owner, attribute), f"private API {name} is gone; update trainer/private_apis.py"


def test_the_instance_attributes_exist_on_live_objects(tmp_path, monkeypatch):
    import tensorflow as tf
    import tf_keras as keras
    from tf_keras.src.distribute.worker_training_state import WorkerTrainingState

    model = keras.Sequential([keras.layers.Dense(1, input_shape=(2,))])
    model.compile(loss="mse")
    assert private_apis.train_counter(model) == 0
    state = WorkerTrainingState(model, str(tmp_path / "backup"), save_freq="epoch")
    assert private_apis.backup_position(state) == (-1, -1)
    private_apis.set_backup_step(state, 3)
    assert private_apis.backup_position(state) == (-1, 3)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), str(tmp_path / "ckpt"), max_to_keep=1)
    private_apis.set_checkpoints_to_keep(manager, 3)
    for _ in range(4):
        manager.save()
    assert len(manager.checkpoints) == 3  # the setting took effect

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # no network call is made
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="p", credentials=AnonymousCredentials())
    assert isinstance(private_apis.storage_credentials(client), AnonymousCredentials)
    assert private_apis.storage_transient_predicate()(ConnectionError())


def test_the_vgg16_notop_file_and_hash_keras_checks():
    url, md5 = private_apis.vgg16_notop_weights()

    assert url.startswith("https://") and url.endswith("_notop.h5")
    assert len(md5) == 32 and md5 != "64373286793e3c8b2b4e3219cbf3544b"  # not the with-top file's hash
