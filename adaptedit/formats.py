"""Which format is an adapter folder: the one place that tells them apart and loads either.

    adaptedit   ADAPTER_DIR/adaptedit.json + adapter.safetensors    (adapter.py)
    peft        PEFT_DIR/adapter_config.json + adapter_model.safetensors  (peft_io.py)
"""

from __future__ import annotations

from pathlib import Path

from adaptedit import adapter, checks, peft_io
from adaptedit.errors import AdapteditError

NATIVE, PEFT = "adaptedit", "peft"


def folder_format(folder: str | Path) -> str | None:
    """"adaptedit", "peft", or None when ``folder`` is not an adapter folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    if (folder / adapter.CONFIG_NAME).exists():
        return NATIVE
    if (folder / peft_io.CONFIG).exists():
        return PEFT
    return None


def load_adapter(folder: str | Path) -> adapter.Adapter:
    """Load a native adaptedit adapter, or import a PEFT folder (LoRA/DoRA, OFT, HRA ...)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapteditError(f"{folder}: no such adapter folder")
    kind = folder_format(folder)
    if kind == NATIVE:
        return adapter.read_adapter(folder)
    if kind == PEFT:
        ad = peft_io.import_peft(folder)
        checks.adapter_tensors(ad)
        return ad
    raise AdapteditError(f"{folder}: not an adapter folder (no {adapter.CONFIG_NAME} or "
                         f"{peft_io.CONFIG})")
