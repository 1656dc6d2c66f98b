"""Outputs written whole or not at all: the one "output exists / --force" rule and the atomic
folder writer every command that writes a folder goes through."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adaptedit.errors import AdapteditError


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``; commands call it before any slow work."""
    if Path(out).exists() and not force:
        raise AdapteditError(f"{out}: already exists; pass --force to replace it")


def write_atomic_dir(folder: Path, write, *, force: bool) -> None:
    """Create ``folder`` by calling ``write(tmpdir)`` then renaming: never a half-written folder.

    With ``force`` an existing folder is replaced only after the new one is complete.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapteditError(f"{folder}: exists and is not a folder; choose another output path")
    check_output(folder, force)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as e:
        raise AdapteditError(f"{folder}: cannot create a folder in {folder.parent} "
                             f"({e.strerror or e}); choose another output path") from None
    try:
        write(tmp)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)  # the user's folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapteditError(f"{folder}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
