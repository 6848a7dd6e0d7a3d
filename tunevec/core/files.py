"""Write a folder or a file so that readers see the old version or the new one, each complete.

Every write goes to a uniquely named temporary entry beside the target, ``.NAME.tmp-PID-TOKEN`` (the random token
matters: PID 1 is the same in every container sharing a volume), is fsynced file by file and folder by folder,
and is then moved into place. What is atomic, exactly, on a local POSIX filesystem:

- **A new folder** (no target yet) appears with one ``rename(2)``: a reader sees no folder or the whole one.
- **Replacing a folder** swaps old and new with one ``renameat2(RENAME_EXCHANGE)`` where Linux and the filesystem
  support it (ext4, xfs, btrfs, tmpfs): the target path always names a complete version, then the old one is
  deleted. Elsewhere (other kernels, some network and overlay filesystems) it falls back to rename-aside: the old
  folder is renamed to ``.NAME.old-PID-TOKEN``, the new one renamed in, the old deleted; between those two renames
  the target is **missing** for an instant (a reader gets "not found", never a half-written folder).
- **A file** is replaced with one ``rename(2)`` (``write_file_atomically``): readers see the old or the new bytes.
- A reader that already opened files of the old version keeps reading the old version. A reader that opens two
  files of one folder at different times can get one from each version if a swap lands in between; artifacts guard
  against that with content checksums (docs/artifact-format.md).
- **After a crash** the target is the old or the new version, complete: data, folders and the parent are fsynced
  before and after each rename. A crash can leave ``.NAME.tmp-*`` / ``.NAME.old-*`` entries beside it. The next
  write of the same target deletes those whose writer is gone, and if the rename-aside fallback died between its
  two renames (no target, an ``.old`` entry left) it first puts the old version back.

How the next write knows a writer is gone: every writer holds a shared ``flock`` on the parent folder while it
works; cleanup runs only when it can take that lock exclusively (no writer in that folder is active), so it never
deletes a temporary entry another process, or another container on the same volume, is still writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from tunevec.core.errors import TunevecError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _leftover_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-\d+-[0-9a-f]{{8}}")


def _unique_suffix() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


class _ParentLock:
    """A shared flock on a folder for as long as a write into it runs; cleans stale leftovers of ``name`` first."""

    def __init__(self, parent: Path, name: str):
        self._fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another write in this folder is running: its temporary entries are not stale
            except OSError:
                return  # a filesystem without flock: write without cleanup, since stale cannot be told apart
            else:
                _clean_leftovers(parent, name)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(self._fd)
            raise

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1


def _clean_leftovers(parent: Path, name: str) -> None:
    """Remove the temporary entries of ``name`` that crashed writers left; restore an old version set aside."""
    pattern = _leftover_pattern(name)
    kinds = {p: m.group(1) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))}
    found = list(kinds)
    target = parent / name
    aside = [p for p, kind in kinds.items() if kind == "old"]
    if aside and not target.exists() and not target.is_symlink():
        newest = max(aside, key=lambda p: p.lstat().st_mtime_ns)
        os.rename(newest, target)  # the rename-aside fallback died between its two renames
        found.remove(newest)
        _fsync_dir(parent)
    for p in found:
        _remove(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder from the deepest up, so the whole tree is on disk before the rename."""
    for folder, _, files in os.walk(root, topdown=False):
        for f in files:
            path = os.path.join(folder, f)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None  # a libc without renameat2 (glibc < 2.28, musl < 1.2.?): use the fallback
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (``renameat2(RENAME_EXCHANGE)``); False where that is not supported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


class StagedFolder:
    """A temporary folder beside ``target``: write into ``.path``, then ``commit()`` it into place or ``discard()``.

    ``replace=False`` refuses to commit over an existing target (TunevecError); ``replace=True`` swaps it as the
    module docstring describes. As a context manager it yields ``.path``, commits on success and discards on any
    exception (KeyboardInterrupt included)::

        with StagedFolder(out, replace=force) as tmp:
            (tmp / "manifest.json").write_text(...)
    """

    def __init__(self, target: str | os.PathLike[str], *, replace: bool = False):
        self.target = Path(target)
        self.replace = replace
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._lock = _ParentLock(parent, self.target.name)
        self._suffix = _unique_suffix()
        self.path = parent / f".{self.target.name}.tmp-{self._suffix}"
        try:
            self.path.mkdir()
        except BaseException:
            self._lock.release()
            raise
        self._done = False

    def commit(self) -> Path:
        """fsync the folder's contents and move it to ``target``; returns ``target``."""
        if self._done:
            raise TunevecError(f"{self.target}: this staged folder was already committed or discarded")
        try:
            _fsync_tree(self.path)
            self._move_into_place()
            _fsync_dir(self.target.parent)
        except BaseException:
            self.discard()
            raise
        self._done = True
        self._lock.release()
        return self.target

    def _move_into_place(self) -> None:
        exists = self.target.exists() or self.target.is_symlink()
        if exists and not self.replace:
            raise TunevecError(f"{self.target} already exists; pass --force to replace it")
        if not exists:
            try:
                os.rename(self.path, self.target)
                return
            except OSError as exc:  # created by someone else since the check
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
                if not self.replace:
                    raise TunevecError(f"{self.target} already exists; pass --force to replace it") from exc
        if exchange(self.path, self.target):
            _remove(self.path)  # now the old version
            return
        aside = self.target.parent / f".{self.target.name}.old-{self._suffix}"
        os.rename(self.target, aside)
        os.rename(self.path, self.target)
        _fsync_dir(self.target.parent)
        _remove(aside)

    def discard(self) -> None:
        """Delete the temporary folder (idempotent)."""
        if not self._done:
            _remove(self.path)
            self._done = True
        self._lock.release()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_file_atomically(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace the file ``path`` with ``data`` (str is written as UTF-8): readers see the old or the new bytes.

    The bytes go to ``.NAME.tmp-PID-TOKEN`` beside it, are fsynced, renamed over ``path``, and the folder is fsynced.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _ParentLock(path.parent, path.name)
    tmp = path.parent / f".{path.name}.tmp-{_unique_suffix()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        lock.release()
