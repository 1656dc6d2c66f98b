"""Outputs written whole or not at all, never over an input, never over anything without --force:
the rules every command's output goes through.

- :func:`check_output`: an output that is, contains or lies inside one of the command's inputs
  is refused whatever the flags (paths resolved, symbolic links followed); an existing output
  needs ``--force``.
- :func:`write_atomic_dir` / :func:`write_atomic_file`: the output is written next to its final
  path and renamed into place once complete. Without ``force`` the rename never replaces anything
  (``renameat2(RENAME_NOREPLACE)``; ``link`` for files), so a folder created meanwhile by another
  process survives and this one fails; with ``force`` an existing folder is swapped atomically
  (``RENAME_EXCHANGE``) and removed afterwards.
- Modes: files get ``0o666 & ~umask`` and folders ``0o777 & ~umask``, as any file the user
  creates; nothing is ever made wider.
- :func:`open_append` / :func:`refuse_symlink`: nothing is written through a symbolic link inside
  an adapter folder.
- :func:`folder_lock`: one writer per adapter folder (an flock'ed pid file, stale ones taken over).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from adaptedit import leftovers
from adaptedit.errors import AdapteditError

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


# ----------------------------------------------------------------------------------------- modes


def umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def set_default_modes(folder: Path) -> None:
    """Give ``folder`` and the files directly in it the modes a plain ``mkdir``/``open`` would
    (``mkdtemp``/``mkstemp`` create them private: 0o700/0o600)."""
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, file_mode())
    os.chmod(folder, dir_mode())


# ------------------------------------------------------------------------------- inputs, outputs


def _real(p) -> Path:
    return Path(p).expanduser().resolve()


def check_output(out, force: bool = False, *, inputs=(), option: str = "-o") -> None:
    """Refuse an output that is, contains or lies inside an input (whatever ``force`` says), and an
    existing output without ``force``. ``inputs``: paths (None entries are skipped)."""
    out = Path(out)
    target = _real(out)
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = _real(inp)
        if not src.exists():
            continue
        if target == src:
            how = "is"
        elif src.is_relative_to(target):
            how = "contains"
        elif target.is_relative_to(src):
            how = "lies inside"
        else:
            continue
        raise AdapteditError(f"{option} {out}: {how} the input {inp}; adaptedit never writes over "
                             "its inputs, even with --force; choose another output path")
    leftovers.clean(out.parent, out.name)  # temporary folders of earlier writers that died
    if (out.exists() or out.is_symlink()) and not force:
        raise AdapteditError(f"{out}: already exists; pass --force to replace it")


def refuse_symlink(path: Path, what: str = "") -> None:
    """Refuse to write at ``path`` when it is a symbolic link (writing would go elsewhere)."""
    path = Path(path)
    if path.is_symlink():
        raise AdapteditError(f"{path}: is a symbolic link{' ' + what if what else ''}; adaptedit "
                             "never writes through links inside an adapter folder; remove it")


def open_append(path: Path):
    """Open ``path`` to append text, creating it with the default mode; never through a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_symlink(path)
        raise AdapteditError(f"{path}: cannot write ({e.strerror or e})") from None
    return os.fdopen(fd, "a")


# ------------------------------------------------------------------------------------- renames


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(2); OSError(ENOSYS/EINVAL) where the system or the file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (atomically checked)."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        if not _unsupported(e):
            raise
    # no renameat2: reserve the name with mkdir (atomic), then rename onto the empty folder we
    # made; rename(2) replaces an empty folder only, so anything put there meanwhile survives
    if Path(src).is_dir():
        os.mkdir(dst)
        try:
            os.rename(src, dst)
        except OSError:
            os.rmdir(dst)
            raise
    else:
        os.link(src, dst)
        os.unlink(src)


def _created_meanwhile(folder: Path) -> AdapteditError:
    return AdapteditError(f"{folder}: was created by another process while this one was writing; "
                          "left it as it is and wrote nothing (pass --force to replace it, or "
                          "choose another output path)")


def publish_dir(tmp: Path, folder: Path, *, force: bool) -> None:
    """Move the complete folder ``tmp`` to ``folder`` (see the module docstring)."""
    if not force or not (folder.exists() or folder.is_symlink()):
        try:
            rename_noreplace(tmp, folder)
            return
        except FileExistsError:
            if not force:
                raise _created_meanwhile(folder) from None
    if not folder.is_dir() or folder.is_symlink():
        raise AdapteditError(f"{folder}: exists and is not a folder; choose another output path")
    try:
        _renameat2(tmp, folder, _RENAME_EXCHANGE)  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    except OSError as e:
        if not _unsupported(e):
            raise
    old = folder.with_name(leftovers.old_name(folder.name))
    os.replace(folder, old)
    try:
        rename_noreplace(tmp, folder)
    except BaseException:
        os.replace(old, folder)  # the user's folder back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def _why(e: OSError) -> str:
    """Why a folder could not be made: mkdir(parents=True) says "File exists" when a file stands
    where a folder of the path should be."""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file stands where a folder of that path should be"
    return e.strerror or str(e)


def write_atomic_dir(folder: Path, write, *, force: bool) -> None:
    """Create ``folder`` by calling ``write(tmpdir)`` then renaming: never a half-written folder,
    never a replaced one without ``force`` (even one created while ``write`` ran)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapteditError(f"{folder}: exists and is not a folder; choose another output path")
    if folder.exists() and not force:
        raise AdapteditError(f"{folder}: already exists; pass --force to replace it")
    leftovers.clean(folder.parent, folder.name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=leftovers.tmp_prefix(folder.name), dir=folder.parent))
    except OSError as e:
        raise AdapteditError(f"{folder}: cannot create a folder in {folder.parent} "
                             f"({_why(e)}); choose another output path") from None
    try:
        write(tmp)
        set_default_modes(tmp)
        publish_dir(tmp, folder, force=force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapteditError(f"{folder}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic_file(path: Path, write, *, force: bool, option: str = "-o") -> None:
    """Create the file ``path`` by calling ``write(tmpfile)`` then linking/renaming it into place;
    without ``force`` nothing existing (or created meanwhile) is replaced."""
    path = Path(path)
    if path.is_dir():
        raise AdapteditError(f"{option} {path}: is a folder; give a file path")
    if (path.exists() or path.is_symlink()) and not force:
        raise AdapteditError(f"{option} {path}: already exists; pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        leftovers.clean(path.parent, path.name)
        fd, name = tempfile.mkstemp(prefix=leftovers.tmp_prefix(path.name), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise AdapteditError(f"{option} {path}: cannot create a file in {path.parent} "
                             f"({_why(e)}); choose another path") from None
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _created_meanwhile(path) from None
    except OSError as e:
        raise AdapteditError(f"{option} {path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def replace_file(folder: Path, name: str, write) -> None:
    """Replace ``folder/name`` atomically (a link there is replaced, not written through)."""
    fd, tmp = tempfile.mkstemp(prefix=leftovers.tmp_prefix(name), dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, Path(folder) / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ one writer per folder

LOCK_NAME = ".adaptedit.lock"


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, *, held: bool = True):
    """Hold ``folder``'s writer lock (``.adaptedit.lock``: an flock'ed file holding the pid) for
    the ``with`` block; removed on exit. A second holder is refused naming the first's pid; a lock
    file left by a dead process (its flock died with it) is taken over. ``held=False``: no-op (the
    non-main processes of a data-parallel run)."""
    if not held:
        yield None
        return
    path = Path(folder) / LOCK_NAME
    refuse_symlink(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise AdapteditError(f"{path}: cannot create the lock file ({e.strerror or e}); "
                                 "is the folder read-only?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise AdapteditError(f"{folder}: another adaptedit {what} (pid "
                                 f"{pid if pid is not None else 'unknown'}) is writing this folder;"
                                 " wait for it to finish or stop it") from None
        except OSError:  # no flock on this file system: the pid decides
            pid = _pid_in(fd)
            if pid is not None and pid != os.getpid() and _alive(pid):
                os.close(fd)
                raise AdapteditError(f"{folder}: another adaptedit {what} (pid {pid}) is writing "
                                     "this folder; wait for it to finish or stop it") from None
        try:  # the previous holder may have removed the file between our open and our lock
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _pid_in(fd)  # a dead process's pid when it did not get to remove its lock
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield stale
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the flock goes: a waiter then opens a fresh file
        os.close(fd)
