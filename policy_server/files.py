"""Files and folders replaced atomically: a reader finds the old content or the new, never a part.

That holds even when the writer dies between any two system calls:

- a file is written to a hidden sibling, flushed and fsynced, then ``os.replace``d over its name;
- a folder is built in a hidden sibling, fsynced file by file, then *exchanged* with the old one
  in one system call (Linux ``renameat2(RENAME_EXCHANGE)``), and the old one, now under the
  hidden name, is removed. ``dest`` stays a real folder, so its readers (``from_pretrained``,
  ``glob``, ``shutil.rmtree`` when pruning, a user's ``cp -r``) work as before. A symlink to
  versioned folders would also swap atomically, but every reader that lists, prunes or copies
  the folder would then meet a link.

Hidden siblings are named ``.<name>.partial-<hex>`` (and ``.<name>.old-<hex>``, see below). A
writer holds an ``flock`` on its own partial file or folder until it is done, so the next writer
in the same folder removes the leftovers of a writer that died, and never those of one still
writing (in this process or another). Creating a partial, cleaning and swapping happen under an
``flock`` on the parent folder; building the content does not, so a slow build blocks nobody.

Where the file system cannot exchange (not Linux, NFS, some overlay file systems) the folder is
swapped in two renames, old aside as ``.<name>.old-<hex>`` then new into place: a crash between
them leaves ``dest`` missing until the next writer in that folder renames the old one back.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

Step = Callable[[str], None]
"""Called with a step's name after each system call that changes ``dest``'s folder (tests kill
the process there to check that every crash leaves ``dest`` whole)."""

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-[0-9a-f]{12}")
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextlib.contextmanager
def atomic_file(path: Path, mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """An open file whose content replaces ``path`` when the block ends without an error.

    The content is flushed and fsynced, renamed over ``path``, and the rename synced; when the
    block raises, ``path`` keeps its old content (or stays absent). Text mode writes UTF-8.
    """
    path = Path(path)
    tmp, fd = _create_partial(path, directory=False)
    with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:  # closing it unlocks
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # before close: the lock on ``tmp`` lasts until it is gone
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def write_durably_at(path: Path, offset: int, data: bytes) -> int:
    """Write ``data`` at byte ``offset`` of ``path`` (created if missing), drop what followed (a
    record a crash cut short), and fsync; returns the new end, ``offset + len(data)``. The append
    of the journals (``training.journal``, ``llm.grpo_journal``): ``offset`` is the end of their
    last whole record."""
    with path.open("r+b" if path.exists() else "wb") as f:
        f.seek(offset)
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return offset + len(data)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Replace ``path``'s content with ``data`` atomically (see ``atomic_file``); returns ``path``."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """Replace ``path``'s content with ``text`` (UTF-8) atomically; returns ``path``."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def replacing_dir(dest: Path, on_step: Step | None = None) -> Iterator[Path]:
    """A new empty hidden folder beside ``dest``; when the block ends without an error, it
    replaces ``dest`` atomically (``atomic_replace_dir``). When the block raises, the new folder
    is removed and ``dest`` stays as it was."""
    dest = Path(dest)
    build, fd = _create_partial(dest, directory=True)
    try:
        if on_step is not None:
            on_step("staged")
        yield build
        atomic_replace_dir(build, dest, on_step)
    except BaseException:
        _remove(build)
        raise
    finally:
        os.close(fd)  # releases the lock


def atomic_replace_dir(build: Path, dest: Path, on_step: Step | None = None) -> None:
    """Make the complete folder ``build`` appear as ``dest``, replacing any old ``dest`` at once.

    ``build`` must be on ``dest``'s file system (``replacing_dir`` makes one beside it) and is
    consumed. Its files are fsynced first, so after a crash ``dest`` is the old folder or the
    complete new one; readers of ``dest`` never see it missing or half written.
    """
    build, dest = Path(build), Path(dest)
    step = on_step or _no_step
    _fsync_tree(build)
    step("synced")
    with _locked(dest.parent):
        _clean_leftovers(dest.parent)
        if not os.path.lexists(dest):
            os.rename(build, dest)
            step("renamed")
        else:
            try:
                _exchange(build, dest)
            except OSError as exc:
                if exc.errno not in _NO_EXCHANGE:
                    raise
                _replace_in_two_renames(build, dest, step)
                return
            step("exchanged")
            _fsync_dir(dest.parent)
            step("parent synced")
            _remove(build)  # the old folder, under the hidden name
            step("old removed")
            return
        _fsync_dir(dest.parent)
        step("parent synced")


def _replace_in_two_renames(build: Path, dest: Path, step: Step) -> None:
    # the gap between the renames is repaired by _clean_leftovers, see the module docstring
    aside = _hidden_sibling(dest, "old")
    os.rename(dest, aside)
    step("moved aside")
    os.rename(build, dest)
    step("renamed")
    _fsync_dir(dest.parent)
    step("parent synced")
    _remove(aside)
    step("old removed")


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one system call; OSError (ENOSYS, EINVAL...) where that is not possible."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a))
    rename.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def clean_leftovers(folder: Path) -> int:
    """Remove what writers that died left in ``folder`` (see ``_clean_leftovers``), as a store does
    when it opens rather than at its next write; returns how many entries went. A missing folder
    has none."""
    if not folder.is_dir():
        return 0
    with _locked(folder):
        return _clean_leftovers(folder)


def _create_partial(dest: Path, directory: bool) -> tuple[Path, int]:
    """Create ``dest``'s hidden partial sibling and lock it: its path and locked descriptor."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent):
        _clean_leftovers(dest.parent)
        path = _hidden_sibling(dest, "partial")
        if directory:
            path.mkdir()
            fd = os.open(path, os.O_RDONLY)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


def _hidden_sibling(dest: Path, kind: Literal["partial", "old"]) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{secrets.token_hex(6)}")


def _clean_leftovers(folder: Path) -> int:
    """Remove the partial files and folders of writers that died; put back an old folder that a
    two-rename swap moved aside when its new one never arrived. Call with ``folder`` locked.
    Returns how many entries it removed or put back."""
    cleaned = 0
    for entry in folder.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None:
            continue
        fd = _try_lock(entry)
        if fd is None:  # its writer is still at work
            continue
        try:
            original = folder / match["name"]
            if match["kind"] == "old" and not os.path.lexists(original):
                os.rename(entry, original)
            else:
                _remove(entry)
            cleaned += 1
        finally:
            os.close(fd)
    return cleaned


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, deepest first, then ``root``."""
    for path in sorted(root.rglob("*"), reverse=True):
        if not path.is_symlink():
            _fsync_path(path)
    _fsync_path(root)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: a folder opens read-only and syncs)."""
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_step(_: str) -> None:
    pass
