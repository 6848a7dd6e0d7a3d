"""The atomic-folder helper: unique temp names, no moment without a complete target, crash leftovers cleaned.

Issue 12 finding 8 (crash safety of caches) and issue 13 point 6 (one write-to-temp-then-rename helper).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import pytest

from tunevec.core import files
from tunevec.core.errors import TunevecError
from tunevec.core.files import StagedFolder, exchange, write_file_atomically


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "a.txt").write_text(content)
    (path / "sub").mkdir()
    (path / "sub" / "b.txt").write_text(content * 2)
    return path


def _read(path: Path) -> tuple[str, str]:
    return (path / "a.txt").read_text(), (path / "sub" / "b.txt").read_text()


def _exchange_supported(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def test_a_new_folder_appears_complete_and_nothing_else_is_left(tmp_path):
    with StagedFolder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("newnew")
        assert not (tmp_path / "out").exists()
    assert _read(tmp_path / "out") == ("new", "newnew")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temp_folders_are_named_by_pid_and_a_random_token(tmp_path, monkeypatch):
    # PID 1 is the same in every container that shares a volume: the PID alone does not make a name unique.
    monkeypatch.setattr(os, "getpid", lambda: 1)
    a, b = StagedFolder(tmp_path / "out"), StagedFolder(tmp_path / "out")
    try:
        assert a.path != b.path
        for staged in (a, b):
            assert re.fullmatch(r"\.out\.tmp-1-[0-9a-f]{8}", staged.path.name)
    finally:
        a.discard()
        b.discard()
    assert list(tmp_path.iterdir()) == []


def test_an_exception_discards_the_temp_folder_and_keeps_the_old_target(tmp_path):
    _folder(tmp_path / "out", "old")
    with pytest.raises(KeyboardInterrupt), StagedFolder(tmp_path / "out", replace=True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert _read(tmp_path / "out") == ("old", "oldold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_target_is_refused_without_replace(tmp_path):
    _folder(tmp_path / "out", "old")
    staged = StagedFolder(tmp_path / "out")
    (staged.path / "a.txt").write_text("new")
    with pytest.raises(TunevecError, match="already exists"):
        staged.commit()
    assert _read(tmp_path / "out") == ("old", "oldold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_commit_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    staged = StagedFolder(tmp_path / "out")
    (staged.path / "a.txt").write_text("x")
    (staged.path / "sub").mkdir()
    (staged.path / "sub" / "b.txt").write_text("y")
    tmp = staged.path
    staged.commit()
    for path in (tmp / "a.txt", tmp / "sub" / "b.txt", tmp / "sub", tmp):
        assert str(path) in synced, f"{path} was not fsynced before the rename"
    assert synced[-1] == str(tmp_path)  # the parent, after the rename


def test_replacing_a_folder_never_leaves_the_target_missing_or_partial(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE); the fallback is tested below")
    out = _folder(tmp_path / "out", "old")
    seen: list[tuple[str, str]] = []
    real_rename, real_exchange = os.rename, files.exchange

    def check_after(fn):
        def wrapped(*args):
            result = fn(*args)
            seen.append(_read(out))  # raises FileNotFoundError if the target is missing at this step
            return result

        return wrapped

    monkeypatch.setattr(os, "rename", check_after(real_rename))
    monkeypatch.setattr(files, "exchange", check_after(real_exchange))
    with StagedFolder(out, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("newnew")
    assert seen == [("new", "newnew")]  # one step, and after it the new version is there whole
    assert _read(out) == ("new", "newnew")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fallback_rename_aside_recovers_after_a_crash_between_its_renames(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    monkeypatch.setattr(files, "exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_rename = os.rename
    calls = {"n": 0}

    def crash_on_second(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the old folder is aside, the new one not yet in: the process dies here
            raise SystemExit("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second)
    staged = StagedFolder(out, replace=True)
    (staged.path / "a.txt").write_text("new")
    with pytest.raises(SystemExit):
        staged.commit()
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".out.old"]
    # The next write of the same target puts the old version back before it starts.
    staged = StagedFolder(out, replace=True)
    assert _read(out) == ("old", "oldold")
    _folder(staged.path / "new", "n")
    staged.commit()
    assert (out / "new" / "a.txt").read_text() == "n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fallback_replaces_a_folder(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    with StagedFolder(out, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert not (out / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_dead_writer_are_cleaned_but_a_live_writers_are_not(tmp_path):
    stale = tmp_path / ".out.tmp-1-0123abcd"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    live = StagedFolder(tmp_path / "other")  # another writer in the same folder, still running
    unrelated = tmp_path / ".other.tmp-1-0123abcd"  # a leftover of another target
    unrelated.mkdir()
    with StagedFolder(tmp_path / "out"):
        pass
    assert stale.exists(), "a write must not clean while another writer in the folder holds its lock"
    live.commit()
    with StagedFolder(tmp_path / "out", replace=True):
        pass
    assert not stale.exists()
    assert unrelated.exists(), "only the target's own leftovers are cleaned"
    # A writer in another process or container holds the same kind of lock on the folder.
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        stale.mkdir()
        with StagedFolder(tmp_path / "out", replace=True):
            pass
        assert stale.exists()
    finally:
        os.close(fd)


def test_write_file_atomically_replaces_a_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "d" / "cell.json"
    write_file_atomically(path, "first")
    # Another container (also PID 1) is writing the same file right now through the old PID-only temp name.
    monkeypatch.setattr(os, "getpid", lambda: 1)
    theirs = tmp_path / "d" / ".cell.json.tmp-1"
    theirs.write_text("their half-written bytes")
    write_file_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    assert theirs.read_text() == "their half-written bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == [".cell.json.tmp-1", "cell.json"]


def test_eval_runner_writes_result_files_through_the_helper(tmp_path, monkeypatch):
    from tunevec.eval.harness import _write_json

    monkeypatch.setattr(os, "getpid", lambda: 1)
    theirs = tmp_path / ".cell.json.tmp-1"  # a concurrent writer in another container, also PID 1
    theirs.write_text("theirs")
    _write_json(tmp_path / "cell.json", {"a": 1})
    assert (tmp_path / "cell.json").read_text() == '{\n  "a": 1\n}\n'
    assert theirs.read_text() == "theirs"
