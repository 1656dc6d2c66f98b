"""Temporary files of writers that died (SIGKILL, OOM, power loss) are cleaned at the next run.

Every temporary name adaptedit creates carries its writer's pid and a hash of its host name:

    .NAME.tmp-PID-HOST-<random>    a folder or file being written (renamed to NAME when complete)
    .NAME.old-PID-HOST             the previous NAME while --force swaps in the new one

A killed writer leaves them behind (a killed merge leaves a whole model). :func:`clean` removes
those whose process no longer runs on this host, and says so on stderr; a live writer's files,
another host's (a shared file system) and names of any other shape are never touched. An ``.old``
folder whose NAME is missing (a swap interrupted between its two renames) is put back as NAME.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from pathlib import Path

PATTERN = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})"
                     r"(?:-.*)?")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def tmp_prefix(name: str) -> str:
    """The prefix of a temporary file or folder that becomes ``name`` (for mkdtemp/mkstemp)."""
    return f".{name}.tmp-{os.getpid()}-{_host()}-"


def old_name(name: str) -> str:
    """Where ``name`` waits while a replacement is renamed into place."""
    return f".{name}.old-{os.getpid()}-{_host()}"


def alive(pid: int) -> bool:
    """True unless ``pid`` surely does not run on this host (signal 0 probes without signalling)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid we cannot probe: keep its files
    return True


def clean(parent: Path, name: str | None = None) -> list[str]:
    """Remove the leftovers of dead writers in ``parent`` (only those of ``name`` when given).

    Returns one line per action, also printed on stderr as a note.
    """
    from adaptedit import console

    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return []
    host, done = _host(), []
    for p in entries:
        m = PATTERN.fullmatch(p.name)
        if (not m or m["host"] != host or (name is not None and m["name"] != name)
                or alive(int(m["pid"])) or p.is_symlink()):
            continue
        target = p.parent / m["name"]
        try:
            if m["what"] == "old" and not os.path.lexists(target):
                os.replace(p, target)
                done.append(f"restored {target} from {p.name}, left by process {m['pid']} "
                            "(no longer running) in the middle of a replacement")
                continue
            size = _size(p)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue  # not ours to remove (permissions): leave it
        done.append(f"removed {p} ({size / 1e6:.1f} MB), left by process {m['pid']} which no "
                    "longer runs")
    for line in done:
        console.note(line)
    return done


def _size(p: Path) -> int:
    if not p.is_dir():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
