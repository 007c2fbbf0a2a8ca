"""Files and folders written whole or not at all (agriclip.atomic)."""

import errno
import json
import os

import pytest

from agriclip.atomic import (
    atomic_open,
    atomic_path,
    replace_entries,
    replace_folder,
    write_json_atomically,
    write_text_atomically,
)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomically(target, {"top1": 0.5})
    before = target.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        with atomic_open(target) as handle:
            handle.write('{"top1": 0.')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_bytes() == before and json.loads(before) == {"top1": 0.5}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.json"]
    write_text_atomically(target, "replaced")
    assert target.read_text() == "replaced"


def test_the_temporary_path_keeps_the_suffix_and_is_hidden(tmp_path):
    with atomic_path(tmp_path / "sub" / "plot.png") as staging:
        assert staging.suffix == ".png" and staging.name.startswith(".") and staging.parent == tmp_path / "sub"
        staging.write_bytes(b"png")
    assert (tmp_path / "sub" / "plot.png").read_bytes() == b"png" and not staging.exists()


def test_replace_folder_swaps_whole_and_cleans_what_a_kill_left(tmp_path):
    target, staging = tmp_path / "final", tmp_path / ".staging-final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (tmp_path / ".previous-final").mkdir()  # left by a process killed between the two renames
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_folder(staging, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]
    assert [path.name for path in target.iterdir()] == ["new.txt"]


def test_replace_entries_keeps_the_users_files_and_drops_stale_outputs(tmp_path):
    folder, staging = tmp_path / "build", tmp_path / "build" / ".staging"
    (folder / "webdataset").mkdir(parents=True)
    (folder / "imagefolder").mkdir()
    (folder / "imagefolder" / "old.png").write_bytes(b"old")
    (folder / "NOTES.md").write_text("mine")
    (staging / "imagefolder").mkdir(parents=True)
    (staging / "imagefolder" / "new.png").write_bytes(b"new")
    replace_entries(staging, folder, ("imagefolder", "webdataset"))
    assert sorted(path.name for path in folder.iterdir()) == ["NOTES.md", "imagefolder"]
    assert [path.name for path in (folder / "imagefolder").iterdir()] == ["new.png"]
