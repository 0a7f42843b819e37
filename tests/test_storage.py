"""trainer.storage on local paths: files others can read, and write failures named as user errors."""

from __future__ import annotations

import os
import stat

import pytest

from trainer import storage
from trainer.errors import ConfigError


@pytest.fixture
def umask():
    """Set the process's umask for one test (restored afterwards)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(umask, tmp_path, mask, mode):
    umask(mask)
    path = tmp_path / "out" / "summary.json"

    storage.write_text(str(path), "{}")
    storage.write_bytes(str(path), b"{}\n")  # replacing keeps the rule

    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"{}\n"
    assert sorted(os.listdir(path.parent)) == ["summary.json"]  # no temporary file is left behind


def test_a_file_where_a_directory_must_be_is_a_config_error_naming_it(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file")

    for target in (blocker / "summary.json", blocker / "export" / "labels.txt"):
        with pytest.raises(ConfigError) as info:
            storage.write_text(str(target), "x")
        assert str(info.value) == f"cannot write {target}: {blocker} is a file, not a directory; choose another path"
    with pytest.raises(ConfigError, match=f"^cannot write {blocker / 'logs'}: {blocker} is a file, not a directory"):
        storage.makedirs(str(blocker / "logs"))


def test_writing_onto_a_directory_is_a_config_error(tmp_path):
    (tmp_path / "summary.json").mkdir()

    with pytest.raises(ConfigError) as info:
        storage.write_text(str(tmp_path / "summary.json"), "{}")

    assert str(info.value) == f"cannot write {tmp_path / 'summary.json'}: it is a directory; choose a file path"
    assert os.listdir(tmp_path) == ["summary.json"]
