"""The merged checkpoint folder: safetensors shards streamed tensor by tensor, and its side files.

    OUT/model.safetensors                 (or model-0000K-of-0000N.safetensors + the index JSON,
                                           planned by huggingface_hub's split_torch_state_dict_into_shards)
    OUT/config.json                       the base's, with the output dtype
    OUT/generation_config.json, tokenizer files    copied verbatim

The base is read one tensor at a time (:func:`open_files`, :func:`read_tensor`) and each output shard
is written one tensor at a time (:func:`write_safetensors`), so the peak memory is about one tensor
whatever the model and shard sizes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import torch

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.models import ST_DTYPES, TOKENIZER_FILES, ModelSource

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_SHARD = "5GB"  # as transformers; streaming makes memory independent of it


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes from 200MB, 1.5GB, 512MiB or a plain byte count; positive, else a usage error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = m and m[2].upper()
    if not m or unit not in SIZE_UNITS or float(m[1]) * SIZE_UNITS[unit] < 1:
        raise UsageError(f"--max-shard-size {size!r}: expected a positive size such as 200MB, 2GB, "
                         "512MiB or a byte count")
    return int(float(m[1]) * SIZE_UNITS[unit])


ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def write_safetensors(path: Path, specs: dict, produce, metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time: ``specs`` is {name: (shape, dtype)} in file
    order and ``produce(name)`` returns each tensor when its turn comes.

    safetensors' ``save_file`` needs every tensor of a file in memory at once; a merge would then
    hold a whole output shard. The format is simple enough to stream (an 8-byte little-endian header
    length, a JSON header with each tensor's dtype, shape and byte range, padded with spaces to a
    multiple of 8, then the raw bytes in order), so the peak is one tensor whatever the shard size.
    Files read back with ``safe_open`` and transformers like any other.
    """
    # widest dtypes first (as save_file does): every tensor starts at an offset aligned to its dtype
    specs = dict(sorted(specs.items(), key=lambda kv: -kv[1][1].itemsize))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in specs.items():
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:  # a bug, never user input
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned "
                                   f"{tuple(shape)} {dtype}")
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t


def open_files(ckpt) -> dict:
    """Handles on the base shards, with the pread backend where this safetensors has it (reads do
    not map the file into the process, so the page cache of the base is not counted as ours)."""
    from safetensors import safe_open

    handles = {}
    for name in ckpt.files:
        path = str(ckpt.folder / name)
        try:
            handles[name] = safe_open(path, framework="pt", backend="pread")
        except Exception:  # older safetensors: no backend argument
            handles[name] = ckpt.files[name]
    return handles


def read_tensor(handles, ckpt, key: str) -> torch.Tensor:
    try:
        return handles[ckpt.file_of(key)].get_tensor(key)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AdapteditError(f"{ckpt.folder / ckpt.file_of(key)}: cannot read {key} ({first}); "
                             "the file may be truncated: fetch the base again") from None


def config_dtype(source: ModelSource, ckpt) -> torch.dtype:
    """The base's dtype: config.json's ``dtype``/``torch_dtype``, else its first float tensor's."""
    raw = json.loads((source.path / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name in table:
        return table[name]
    for k in ckpt.keys():
        dt = ckpt.dtype(k)
        if dt.is_floating_point:
            return dt
    return torch.float32


def write_side_files(source: ModelSource, tmp: Path, dtype: torch.dtype) -> None:
    """config.json with the output dtype; generation config, tokenizer files and, for a model with
    its own code (config.json's auto_map), the Python files next to it copied verbatim."""
    cfg = json.loads((source.path / "config.json").read_text())
    name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    code = sorted(p.name for p in source.path.glob("*.py")) if cfg.get("auto_map") else []
    for fname in ("generation_config.json", *TOKENIZER_FILES, *code):
        src = source.path / fname
        if src.is_file():
            shutil.copyfile(src, tmp / fname)
