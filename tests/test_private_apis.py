"""Every private API in trainer/private_apis.py still exists on the installed versions.

An upgrade of TensorFlow, tf-keras or google-cloud-storage that moves one fails here, naming it,
instead of somewhere inside a training run.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from trainer import private_apis

#: Attributes set on instances (in __init__ or by tf.Module tracking), checked on a live object.
INSTANCE_ATTRIBUTES = {
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


def test_the_instance_attributes_exist_on_live_objects(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # no network call is made
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="p", credentials=AnonymousCredentials())
    assert isinstance(private_apis.storage_credentials(client), AnonymousCredentials)
    assert private_apis.storage_transient_predicate()(ConnectionError())


#: Modules whose insides are private, and the names the trainer gives library objects.
PRIVATE_MODULES = ("tensorflow.python", "tensorflow.compiler", "tf_keras.src", "keras.src", "google.cloud.storage._")
LIBRARY_OBJECTS = {
    "tf",
    "tensorflow",
    "keras",
    "tf_keras",
    "model",
    "optimizer",
    "strategy",
    "client",
    "blob",
    "bucket",
}


def _private_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        found += [f"{path.name}:{node.lineno} imports {m}" for m in modules if m.startswith(PRIVATE_MODULES)]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if owner in LIBRARY_OBJECTS:
                found.append(f"{path.name}:{node.lineno} reads {owner}.{node.attr}")
    return found


def test_no_other_module_reaches_into_a_library():
    package = Path(private_apis.__file__).parent
    uses = [
        use for path in sorted(package.rglob("*.py")) if path.name != "private_apis.py" for use in _private_uses(path)
    ]

    assert uses == [], "private APIs outside trainer/private_apis.py: " + "; ".join(uses)


def test_the_vgg16_notop_file_and_hash_keras_checks():
    url, md5 = private_apis.vgg16_notop_weights()

    assert url.startswith("https://") and url.endswith("_notop.h5")
    assert len(md5) == 32 and md5 != "64373286793e3c8b2b4e3219cbf3544b"  # not the with-top file's hash
