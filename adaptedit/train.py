"""Fine-tune an adapter: one training loop, atomic checkpoints, exact resume (``adaptedit train``).

The base model stays frozen and untouched; AdamW updates θ (``layer.trainable_parameters``) only.
One optimizer step consumes G = batch × grad_accum × world examples from a seeded stream
(:class:`adaptedit.data.Stream`), so the whole data position is the step number. The loss is the
mean cross-entropy over the step's trained tokens (token-weighted across micro-batches and ranks),
computed on trained positions only: the output head never sees a masked position.

Checkpoints: ``OUT/checkpoints/step-NNNNNN/`` is a complete native adapter folder (adaptedit.json
+ adapter.safetensors) plus ``trainer_state.safetensors`` (optimizer moments, RNG states as uint8)
and ``trainer_state.json`` (step, data position, schedule, resolved config, data statistics).
No pickle anywhere. Each checkpoint is written to a temporary folder and renamed; the adapter
folder's own two files are replaced by atomic renames at each save.

Multi-GPU: data parallel under ``torchrun``; each rank runs ``grad_accum`` micro-batches of its
share of the step, the gradients are summed with one all-reduce (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptedit import __version__, checks, data as D, leftovers, methods
from adaptedit.adapter import CONFIG_NAME, TENSORS_NAME, Adapter, save_adapter, write_adapter_files
from adaptedit.atomic import (check_output, file_mode, folder_lock, open_append, refuse_symlink,
                              replace_file, write_atomic_dir)
from adaptedit.binding import base_for, check_base
from adaptedit.formats import load_adapter
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.layer import adapted_layers, attach, collect, penalty

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
METRICS = "metrics.jsonl"
PATHS = ("data", "eval_data", "chat_template")
# train reads the base the adapter records (it has no --base): the fix is that base, or a new init
TRAIN_BASE_FIX = ("train uses the base recorded in the adapter: restore that model, or run "
                  "`adaptedit init` on this one")
# options that fix the trajectory: --resume refuses to change them
LOCKED = ("data", "eval_data", "eval_split", "steps", "epochs", "batch_size", "grad_accum",
          "max_length", "lr", "lr_schedule", "warmup", "weight_decay", "max_grad_norm",
          "mask_prompt", "dtype", "seed", "chat_template", "skip_bad_rows")


@dataclass
class TrainConfig:
    data: str = ""
    eval_data: str | None = None
    eval_split: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    lr: float | None = None  # default: the method's (its LR)
    lr_schedule: str = "cosine"
    warmup: float = 0.0  # steps (≥ 1) or a fraction of the steps (< 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    mask_prompt: bool = True
    device: str = "auto"
    dtype: str = "auto"
    grad_checkpointing: bool = False
    eval_every: int = 0  # 0 = at the start and the end only
    save_every: int = 100
    seed: int = 0
    chat_template: str | None = None
    skip_bad_rows: bool = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def load_toml(path: Path) -> dict:
    """Options from a TOML file (top level or a [train] table); unknown keys are an error."""
    import tomllib

    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise AdapteditError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise AdapteditError(f"--config {path}: invalid TOML ({e})") from None
    raw = raw.get("train", raw)
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: 'train' must be a table ([train])")
    out = {}
    types = {f.name: f.type for f in fields(TrainConfig)}
    for k, v in raw.items():
        key = k.replace("-", "_")
        if key not in TrainConfig.names():
            raise UsageError(f"--config {path}: unknown option {k!r}; known: "
                             f"{', '.join(n.replace('_', '-') for n in TrainConfig.names())}")
        kind = str(types[key]).split(" |")[0]  # "int | None": TOML has no null
        ok, what = TOML_TYPES[kind]
        if not ok(v):
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
            raise UsageError(f"--config {path}: {k} = {shown} must be {what}, as --"
                             f"{key.replace('_', '-')} on the command line")
        out[key] = float(v) if kind == "float" else v
    return out


TOML_TYPES = {
    "bool": (lambda v: isinstance(v, bool), "true or false (a TOML boolean)"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def make_config(cli: dict, config_file: Path | None = None, *,
                resume: bool = False) -> tuple[TrainConfig, set]:
    """Defaults < config file < command line. Returns the config and the names set explicitly."""
    given = load_toml(config_file) if config_file else {}
    given.update({k: v for k, v in cli.items() if v is not None})
    for k in PATHS:  # absolute: a run resumes from any working directory
        if given.get(k):
            given[k] = str(Path(given[k]).expanduser().absolute())
    cfg = TrainConfig(**given)
    validate(cfg, resume=resume)
    return cfg, set(given)


def method_lr(method: str) -> float:
    """The learning rate used when --lr is not given: the method paper's, else LoRA's 2e-4."""
    return methods.get(method).LR


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return a == b
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def validate(cfg: TrainConfig, resume: bool = False) -> None:
    def bad(msg):
        raise UsageError(msg)

    if not cfg.data and not resume:
        bad("--data FILE is required")
    for name in ("eval_split", "epochs", "lr", "warmup", "weight_decay", "max_grad_norm"):
        checks.finite(getattr(cfg, name), f"--{name.replace('_', '-')}")
    checks.seed(cfg.seed)
    if cfg.eval_data and cfg.eval_split:
        bad("use either --eval-data or --eval-split, not both")
    if not 0 <= cfg.eval_split < 1:
        bad("--eval-split must be in [0, 1)")
    if cfg.steps is not None and cfg.epochs is not None:
        bad("use either --steps or --epochs, not both")
    if cfg.steps is not None and cfg.steps < 1 or cfg.epochs is not None and cfg.epochs <= 0:
        bad("--steps / --epochs must be positive")
    for name in ("batch_size", "grad_accum", "max_length"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must be ≥ 1")
    if cfg.max_length < 2:
        bad("--max-length must be ≥ 2")
    if cfg.lr is not None and not cfg.lr > 0:
        bad("--lr must be positive")
    if cfg.lr_schedule not in ("cosine", "linear", "constant"):
        bad(f"--lr-schedule {cfg.lr_schedule!r}: use cosine, linear or constant")
    if cfg.warmup < 0 or cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        bad("--warmup, --weight-decay and --max-grad-norm must be ≥ 0")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        bad(f"--dtype {cfg.dtype!r}: use auto, bf16, fp16 or fp32")
    if cfg.eval_every < 0 or cfg.save_every < 0:
        bad("--eval-every and --save-every must be ≥ 0")


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return base
    p = (step - warmup) / (total - warmup)  # in [0, 1)
    return base * (0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p)


# ------------------------------------------------------------------------------ devices, processes


class Dist:
    """Data parallel under torchrun (WORLD_SIZE > 1); a no-op for one process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def stop(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def pick_device(device: str, dist: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AdapteditError("--device cuda: no CUDA GPU is available here; use --device cpu")
        if dist.world > 1 or device == "cuda":
            device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(torch.device(device))
    elif device != "cpu":
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------- loss


class TrainedPositions:
    """Feed the output head only the positions that predict a trained token.

    A forward pre-hook on the model's output embedding replaces its (B, T, H) input with the
    (1, N, H) rows selected by ``self.select``; logits are then (1, N, V) instead of (B, T, V).
    """

    def __init__(self, model):
        head = model.get_output_embeddings()
        if head is None:
            raise AdapteditError(f"{type(model).__name__} has no output head; train needs a causal "
                                 "language model")
        self.select = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.select is None:
            return None
        h = args[0]
        return (h[self.select].unsqueeze(0),) + tuple(args[1:])  # (1, N, H)


def loss_sum(model, positions: TrainedPositions, batch: dict, device) -> torch.Tensor:
    """Σ cross-entropy over the batch's trained tokens (float32 scalar)."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    target_mask = labels[:, 1:] != D.IGNORE  # (B, T-1): position p predicts token p+1
    positions.select = F.pad(target_mask, (0, 1))  # (B, T)
    targets = labels[:, 1:][target_mask]  # (N,)
    try:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
    finally:
        positions.select = None
    if logits.shape[-2] != targets.numel():
        raise AdapteditError(f"{type(model).__name__}: unexpected logits shape {tuple(logits.shape)}"
                             "; this model's head is not supported by train")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")


# -------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints of ``folder``, oldest first (temporary folders are ignored)."""
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d{6,}", p.name)
             and (p / STATE_JSON).exists() and (p / TENSORS_NAME).exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def update_adapter_folder(adapter: Adapter, folder: Path) -> None:
    """Replace adapter.safetensors, then adaptedit.json, each by an atomic rename."""
    tmp = Path(tempfile.mkdtemp(prefix=leftovers.tmp_prefix("save"), dir=folder))
    try:
        write_adapter_files(adapter, tmp)
        for name in (TENSORS_NAME, CONFIG_NAME):
            os.chmod(tmp / name, file_mode())
            os.replace(tmp / name, folder / name)  # a link there is replaced, not followed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def optimizer_tensors(opt, names: list[str]) -> tuple[dict, dict]:
    """AdamW state as flat tensors keyed by parameter name, and its JSON part."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optimizer.{names[idx]}.{k}"] = v.detach().cpu().reshape(-1).contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer(opt, names: list[str], tensors: dict, meta: dict, device) -> None:
    params = opt.param_groups[0]["params"]
    state = {}
    for idx, name in enumerate(names):
        st = {}
        for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = tensors.get(f"optimizer.{name}.{k}")
            if t is not None:
                st[k] = t.reshape(()) if k == "step" else t.reshape(params[idx].shape).to(device)
        if st:
            state[idx] = st
    groups = [dict(g, params=list(range(len(names)))) for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a run resolved before the loop: shown in the header and saved with checkpoints."""

    folder: Path
    cfg: TrainConfig
    adapter: Adapter
    train_data: D.TokenizedData
    eval_data: D.TokenizedData | None
    total_steps: int
    warmup_steps: int
    lr: float
    device: torch.device
    dtype: torch.dtype
    world: int
    start_step: int = 0
    state: dict = field(default_factory=dict)  # trainer state JSON of the resumed checkpoint
    state_tensors: dict = field(default_factory=dict)
    # the newest checkpoint step in the folder at prepare (above start_step when a damaged newer
    # checkpoint was skipped): train refuses to start if another run saved one since
    newest_step: int | None = None

    @property
    def examples_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def header(self) -> dict:
        c, a = self.cfg, self.adapter.config
        st = self.train_data.stats
        h = {
            "adapter": str(self.folder), "base": a.base.get("ref"),
            "method": a.method + ("+dora" if a.dora else ""), "rank": a.rank, "alpha": a.alpha,
            "data": c.data, "format": st.format, "examples": len(self.train_data),
            "rows": st.rows, "bad_rows_skipped": st.bad_rows, "truncated": st.truncated,
            "dropped_no_target": st.dropped_no_target, "tokens": st.tokens,
            "trained_tokens": st.trained_tokens,
            "masking": ("prompt tokens masked with -100 (only completions / assistant turns are "
                        "trained; --no-mask-prompt trains on all tokens)") if c.mask_prompt
            else "no masking: every token is trained (--no-mask-prompt)",
            "eval_examples": len(self.eval_data) if self.eval_data is not None else 0,
            "steps": self.total_steps, "start_step": self.start_step,
            "batch": f"{c.batch_size} × {c.grad_accum} accum × {self.world} proc = "
                     f"{self.examples_per_step} examples/step",
            "epochs": round(self.total_steps * self.examples_per_step / len(self.train_data), 3),
            "lr": self.lr, "lr_schedule": c.lr_schedule, "warmup_steps": self.warmup_steps,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
        }
        if c.lr is None:
            h["lr_default"] = f"method default ({methods.get(a.method).LR_SOURCE or 'adaptedit'})"
        return h


def _last_intact(folder: Path):
    """The newest checkpoint that reads back whole: (folder, state, config, adapter, tensors).

    A checkpoint damaged after it was written (a disk error, a hand edit) is skipped with a warning
    and the run resumes from the one before; its step is written again.
    """
    from safetensors.torch import load_file

    from adaptedit import console

    ckpts = checkpoint_dirs(folder)
    if not ckpts:
        raise AdapteditError(f"{folder}: --resume found no checkpoint in {folder / CHECKPOINTS}")
    damaged = []
    for last in reversed(ckpts):
        try:
            state = json.loads((last / STATE_JSON).read_text(encoding="utf-8"))
            saved = TrainConfig(**state["config"])
            int(state["step"]), state["optimizer"]["param_groups"]  # noqa: B018 (present)
            adapter = load_adapter(last)
            tensors = load_file(str(last / STATE_TENSORS))
            if "rng.cpu" not in tensors:
                raise KeyError("rng.cpu")
        except Exception as e:  # any damage: JSON, types, keys, safetensors, adapter checks
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            damaged.append(f"{last.name} ({why})")
            continue
        for d in damaged:
            console.warn(f"checkpoint {folder / CHECKPOINTS}/{d} is damaged; resuming from the "
                         f"earlier {last.name}")
        return last, state, saved, adapter, tensors
    raise AdapteditError(f"{folder}: every checkpoint in {folder / CHECKPOINTS} is damaged (newest: "
                         f"{damaged[0]}); start a new run with -o NEW_DIR")


def _check_writable(folder: Path) -> None:
    """Refuse a folder train could not save into, before any work (a probe file, then removed)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=leftovers.tmp_prefix("probe"), dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AdapteditError(f"{folder}: cannot write there ({e.strerror or e}), and train saves "
                             "checkpoints and the trained adapter into it; fix its permissions, "
                             "or train a copy with -o NEW_DIR") from None


def prepare(adapter_dir: Path, cfg: TrainConfig, *, given: set | None = None,
            out: Path | None = None, resume: bool = False, tokenizer=None) -> Run:
    """Resolve the run: adapter, output folder, resume state, tokenizer, data, steps, device."""
    dist = Dist()
    given = given if given is not None else set(TrainConfig.names())
    adapter_dir = Path(adapter_dir)
    folder = Path(out) if out else adapter_dir
    state, state_tensors, start = {}, {}, 0
    if dist.main and folder.is_dir():  # temporary files of runs that were killed
        leftovers.clean(folder)
        leftovers.clean(folder / CHECKPOINTS)
    copy_made = False  # -o NEW written by an earlier attempt that stopped before a checkpoint
    if resume and not checkpoint_dirs(folder) and (folder / CONFIG_NAME).exists():
        # the run stopped before its first checkpoint: there is nothing to continue, so it
        # starts at step 0 (θ is still θ₀: the folder changes only with a checkpoint)
        if not cfg.data:
            raise UsageError(f"{folder}: --resume found no checkpoint (the run stopped before its "
                             "first one), so it starts at step 0: give --data and the run's "
                             "options again")
        resume, copy_made = False, out is not None
    if resume:
        last, state, saved, adapter, state_tensors = _last_intact(folder)
        if saved.lr is None:  # runs record the method's default as "no --lr"
            saved.lr = method_lr(adapter.config.method)
        changed = [k for k in LOCKED if k in given and getattr(cfg, k) != getattr(saved, k)
                   and not (k in PATHS and _same_file(getattr(cfg, k), getattr(saved, k)))]
        if changed:
            raise UsageError(f"--resume continues the run of {last} exactly, but this command "
                             "changes " + ", ".join(f"--{k.replace('_', '-')} to "
                                                    f"{getattr(cfg, k)!r} (the run has "
                                                    f"{getattr(saved, k)!r})" for k in changed)
                             + "; drop them, or start a new run with -o NEW_DIR")
        for k in TrainConfig.names():
            if k not in given or k in LOCKED:
                setattr(cfg, k, getattr(saved, k))
        start = int(state["step"])
    else:
        adapter = load_adapter(folder if copy_made else adapter_dir)
        if out is not None:
            check_output(out, inputs=_inputs_of(adapter, adapter_dir, cfg), force=True,
                         option="-o")
        if out is not None and Path(out).exists() and not copy_made:
            raise AdapteditError(f"-o {out}: already exists; pass --resume to continue its run, or "
                                 "choose a new folder")
        if checkpoint_dirs(folder):
            raise AdapteditError(f"{folder}: holds checkpoints of an earlier run; pass --resume to "
                                 "continue it, or -o NEW_DIR to train a copy")
    if adapter.config.source != "adaptedit":
        raise AdapteditError(f"{adapter_dir}: an imported {adapter.config.source} adapter; convert "
                             "it to a native adapter folder before training")
    if dist.main:
        writable = folder
        while not writable.is_dir() and writable != writable.parent:
            writable = writable.parent  # -o NEW/DIR: the folder it will be created in
        _check_writable(writable)
    device = pick_device(cfg.device, dist)
    dtype = pick_dtype(cfg.dtype, device)
    if tokenizer is None:
        source = base_for(adapter, None)
        tokenizer = source.tokenizer()
    if cfg.chat_template:
        D.set_chat_template(tokenizer, Path(cfg.chat_template))
    load = dict(max_length=cfg.max_length, mask_prompt=cfg.mask_prompt,
                skip_bad_rows=cfg.skip_bad_rows)
    train_data = D.load(Path(cfg.data), tokenizer, **load)
    eval_data = None
    if cfg.eval_data:
        eval_data = D.load(Path(cfg.eval_data), tokenizer, **load)
    elif cfg.eval_split:
        train_data, eval_data = D.split(train_data, cfg.eval_split, cfg.seed)
    if resume and state.get("data_sha256") and state["data_sha256"] != train_data.sha256:
        raise AdapteditError(f"{cfg.data}: the data file changed since this run started (sha256 "
                             "differs); --resume needs the same data")
    g = cfg.batch_size * cfg.grad_accum * dist.world
    total = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * len(train_data) / g)
    warm = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total))
    lr = cfg.lr if cfg.lr is not None else method_lr(adapter.config.method)
    if start >= total:
        raise AdapteditError(f"{folder}: the run already finished ({start}/{total} steps)")
    if not resume and out is not None and not copy_made:
        if dist.main:
            save_adapter(adapter, Path(out), force=False)
    newest = checkpoint_dirs(folder)
    return Run(folder, cfg, adapter, train_data, eval_data, total, warm, lr, device, dtype,
               dist.world, start, state, state_tensors,
               newest_step=int(newest[-1].name[5:]) if newest else 0)


def _inputs_of(adapter: Adapter, adapter_dir: Path, cfg: TrainConfig) -> list:
    """What a run reads: the adapter folder, the data files, the template, the base folder."""
    base = adapter.config.base
    return [adapter_dir, cfg.data, cfg.eval_data, cfg.chat_template,
            base.get("path") if base.get("kind") == "folder" else None]


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved at ``step``."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step}; checkpoint {path}")
        self.step, self.path, self.signum = step, path, int(signum)


class _StopFlag:
    """First SIGINT/SIGTERM asks the loop to save and stop; a second one interrupts at once."""

    def __init__(self):
        self.set = False
        self.signum = signal.SIGINT
        self.old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def train(run: Run, reporter=None, *, model=None) -> dict:
    """The training loop. Returns the summary; raises AdapteditError on a non-finite loss.

    One writer per adapter folder: the main process holds the folder's lock for the whole run
    (a second run is refused naming this one's pid; a lock left by a dead process is taken over).
    """
    refuse_symlink(run.folder / CHECKPOINTS)
    refuse_symlink(run.folder / METRICS)
    with folder_lock(run.folder, "train", held=Dist().main):
        _unchanged_since_prepare(run)
        return _train(run, reporter, model=model)


def _unchanged_since_prepare(run: Run) -> None:
    """Refuse when another run saved checkpoints between :func:`prepare` and the lock."""
    ckpts = checkpoint_dirs(run.folder)
    last = int(ckpts[-1].name[5:]) if ckpts else 0
    if last != (run.newest_step if run.newest_step is not None else run.start_step):
        raise AdapteditError(f"{run.folder}: another run saved checkpoint step {last} after this one "
                             "started; nothing was changed: rerun (--resume continues from it)")


def _train(run: Run, reporter=None, *, model=None) -> dict:
    cfg, dist = run.cfg, Dist()
    dist.start(run.device)
    rep = reporter or _Silent()
    torch.manual_seed(cfg.seed)
    if model is None:
        source = base_for(run.adapter, None)
        check_base(run.adapter, source, fix=TRAIN_BASE_FIX)
        model = source.load(dtype=run.dtype, device=run.device)
    attach(model, run.adapter)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    positions = TrainedPositions(model)
    layers = adapted_layers(model)
    names = [f"{n}.{k}" for n, layer in layers.items() for k in layer.params]
    params = [p for layer in layers.values() for p in layer.params.values()]
    opt = torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    fp16 = run.dtype == torch.float16
    scaler = torch.amp.GradScaler(run.device.type, enabled=fp16)
    autocast = (run.device.type, run.dtype) if run.dtype != torch.float32 else None
    step = run.start_step
    if run.state:
        load_optimizer(opt, names, run.state_tensors, run.state["optimizer"], run.device)
        set_rng(run.state_tensors)
        if fp16 and run.state.get("scaler"):
            scaler.load_state_dict(run.state["scaler"])
    pad = _pad_id(run)
    stream = D.Stream(run.train_data, cfg.seed)
    b, k, g = cfg.batch_size, cfg.grad_accum, run.examples_per_step
    metrics_path = run.folder / METRICS
    if dist.main:
        _truncate_metrics(metrics_path, step)
    history = {"loss": None, "eval_loss": None, "last_saved": step if run.state else None,
               "tokens": int(run.state.get("tokens", 0)), "first_loss": run.state.get("first_loss")}
    rep.start(run.header(), run)

    def evaluate():
        if run.eval_data is None:
            return None
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=run.device)
        with torch.no_grad(), _autocast(autocast):
            for i, batch in enumerate(D.batches(run.eval_data, b, pad)):
                if i % dist.world == dist.rank:
                    tot[0] += loss_sum(model, positions, batch, run.device).double()
                    tot[1] += int((batch["labels"][:, 1:] != D.IGNORE).sum())
        model.train()
        dist.sum(tot)
        return float(tot[0] / tot[1])

    def save(at: int, loss):
        if dist.main:
            adapter = collect(model, run.adapter)
            adapter.config.training = _provenance(run, at, loss, history)
            tensors, opt_meta = optimizer_tensors(opt, names)
            tensors.update(rng_tensors())
            st = {"step": at, "position": at * g, "epoch": at * g / len(run.train_data),
                  "total_steps": run.total_steps, "world_size": run.world, "optimizer": opt_meta,
                  "scheduler": {"kind": cfg.lr_schedule, "base_lr": run.lr,
                                "warmup_steps": run.warmup_steps, "total_steps": run.total_steps,
                                "lr": lr_at(max(at - 1, 0), run.total_steps, run.lr,
                                            cfg.lr_schedule, run.warmup_steps)},
                  "scaler": scaler.state_dict() if fp16 else None,
                  "config": asdict(cfg), "data_sha256": run.train_data.sha256,
                  "data_stats": run.train_data.stats.to_json(), "tokens": history["tokens"],
                  "first_loss": history["first_loss"], "loss": loss,
                  "adaptedit_version": __version__}

            def write(tmp: Path):
                from safetensors.torch import save_file

                write_adapter_files(adapter, tmp)
                save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
                (tmp / STATE_JSON).write_text(json.dumps(st, indent=2) + "\n")

            try:
                write_atomic_dir(run.folder / CHECKPOINTS / f"step-{at:06d}", write, force=True)
                update_adapter_folder(adapter, run.folder)
            except (OSError, AdapteditError) as e:
                raise AdapteditError(_save_failed(run, at, history["last_saved"], e)) from None
            history["last_saved"] = at
            rep.saved(at, run.folder / CHECKPOINTS / f"step-{at:06d}")
        dist.barrier()

    dist.barrier()
    t_start, steps_done = time.perf_counter(), 0
    if step == 0 and run.eval_data is not None:
        history["eval_loss"] = evaluate()
        rep.eval(0, history["eval_loss"])
        _log(metrics_path, dist, {"step": 0, "eval_loss": history["eval_loss"]})
    with _StopFlag() as stop:
        while step < run.total_steps:
            flag = torch.tensor([float(stop.set)], device=run.device)
            if float(dist.sum(flag)) > 0:  # every process stops at the same step
                if history["last_saved"] != step:
                    save(step, history["loss"])
                raise Interrupted(step, run.folder / CHECKPOINTS / f"step-{step:06d}",
                                  stop.signum)
            t0 = time.perf_counter()
            lr = lr_at(step, run.total_steps, run.lr, cfg.lr_schedule, run.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            first = step * g + dist.rank * k * b
            micro = [stream.batch(first + j * b, b, pad) for j in range(k)]
            counts = torch.tensor([float(sum(int((m["labels"][:, 1:] != D.IGNORE).sum())
                                             for m in micro)),
                                   float(sum(int(m["attention_mask"].sum()) for m in micro))],
                                  dtype=torch.float64, device=run.device)
            dist.sum(counts)  # trained tokens and all tokens of the whole step, every rank
            total_loss = torch.zeros((), dtype=torch.float64, device=run.device)
            for m in micro:
                with _autocast(autocast):
                    s = loss_sum(model, positions, m, run.device)
                scaler.scale(s / counts[0].float()).backward()
                total_loss += s.detach().double()
            reg = penalty(model)  # a method's regulariser (HRA's λ‖I − ÛᵀÛ‖²), once per step
            if reg is not None:
                scaler.scale(reg / dist.world).backward()  # summed over ranks with the gradients
            loss = float(dist.sum(total_loss) / counts[0])
            if dist.world > 1:
                _sum_grads(params, dist)
            scaler.unscale_(opt)
            if cfg.max_grad_norm > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            else:
                gnorm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            if not math.isfinite(loss) or (not fp16 and not math.isfinite(gnorm)):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                value = loss if not math.isfinite(loss) else gnorm
                _log(metrics_path, dist, {"step": step + 1, "loss": loss, "grad_norm": gnorm,
                                          "lr": lr, "error": f"non-finite {what}"})
                kept = (f"the adapter folder holds step {history['last_saved']} (the last "
                        "checkpoint)") if history["last_saved"] else \
                    "the adapter folder is unchanged (no checkpoint was written yet)"
                raise AdapteditError(
                    f"{what} is {value} at step {step + 1} (lr {lr:.3g}); stopped, {kept}. Try a "
                    "lower --lr" + (", --max-grad-norm 1.0" if not cfg.max_grad_norm else "")
                    + (", or --dtype fp32" if run.dtype != torch.float32 else "")
                    + (" or --warmup 0.1" if not run.warmup_steps else ""))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_done += 1
            history["loss"] = loss
            history["first_loss"] = history["first_loss"] if history["first_loss"] is not None \
                else loss
            history["tokens"] += int(counts[1])
            dt = time.perf_counter() - t0
            elapsed = time.perf_counter() - t_start
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                   "tokens": int(counts[1]), "trained_tokens": int(counts[0]),
                   "tok_s": counts[1].item() / dt, "step_s": dt,
                   "eta_s": elapsed / steps_done * (run.total_steps - step),
                   "peak_mem_mb": peak_memory_mb(run.device)}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps:
                history["eval_loss"] = rec["eval_loss"] = evaluate()
            _log(metrics_path, dist, rec)
            rep.step(rec, run.total_steps)
            if step == run.total_steps:
                break
            if cfg.save_every and step % cfg.save_every == 0:
                save(step, loss)
    if run.eval_data is not None and steps_done:
        history["eval_loss"] = evaluate()
        rep.eval(step, history["eval_loss"])
        _log(metrics_path, dist, {"step": step, "eval_loss": history["eval_loss"]})
    save(step, history["loss"])
    positions.handle.remove()
    elapsed = time.perf_counter() - t_start
    summary = {"adapter": str(run.folder), "steps": step, "final_loss": history["loss"],
               "first_loss": history["first_loss"], "eval_loss": history["eval_loss"],
               "tokens": history["tokens"], "seconds": round(elapsed, 2),
               "tok_s": history["tokens"] / elapsed if elapsed and steps_done else None,
               "peak_mem_mb": round(peak_memory_mb(run.device), 1),
               "checkpoint": str(run.folder / CHECKPOINTS / f"step-{step:06d}")}
    rep.end(summary)
    dist.stop()
    return summary


def _sum_grads(params, dist: Dist) -> None:
    """One all-reduce (sum) of every gradient, flattened into a single buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([t.reshape(-1) for t in grads])
    dist.sum(flat)
    i = 0
    for p, t in zip(params, grads):
        n = t.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def _autocast(spec):
    import contextlib

    if spec is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=spec[0], dtype=spec[1])


def _pad_id(run: Run) -> int:
    return 0  # padded positions are masked (attention 0, label −100): the id never matters


def _save_failed(run: Run, at: int, last_saved, e: BaseException) -> str:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(": ", 1)[-1]
    kept = (f"the adapter folder holds step {last_saved}" if last_saved
            else "no checkpoint was written yet")
    return (f"{run.folder / CHECKPOINTS}: cannot save the checkpoint of step {at} ({why}); {kept}. "
            "Free disk space (or fix permissions) and continue with --resume")


def _log(path: Path, dist: Dist, rec: dict) -> None:
    if not dist.main:
        return
    line = json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                       for k, v in rec.items()}) + "\n"
    try:
        with open_append(path) as f:  # never through a symbolic link
            f.write(line)
    except OSError as e:
        raise AdapteditError(f"{path}: cannot append the metrics of step {rec.get('step')} "
                             f"({e.strerror or e}); free disk space (or fix permissions) and "
                             "continue with --resume") from None


def _metric_step(line: str):
    """The step of one metrics.jsonl line, or None for a line a killed run left torn."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step", 0) if isinstance(rec, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again),
    and lines that do not parse (a run killed mid-write tears its last line)."""
    refuse_symlink(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = [line for line in lines if (st := _metric_step(line)) is not None and st <= step]
    if step == 0:
        keep = []
    try:
        replace_file(path.parent, path.name,
                     lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))
    except OSError as e:
        raise AdapteditError(f"{path}: cannot rewrite ({e.strerror or e}); fix its permissions "
                             "or free disk space, then continue with --resume") from None


def _provenance(run: Run, step: int, loss, history: dict) -> dict:
    c, st = run.cfg, run.train_data.stats
    return {
        "steps": step, "total_steps": run.total_steps, "lr": run.lr, "lr_schedule": c.lr_schedule,
        "warmup_steps": run.warmup_steps, "alpha": run.adapter.config.alpha,
        "rank": run.adapter.config.rank, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
        "world_size": run.world, "examples_per_step": run.examples_per_step,
        "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm,
        "max_length": c.max_length, "mask_prompt": c.mask_prompt, "seed": c.seed,
        "dtype": str(run.dtype).removeprefix("torch."), "device": str(run.device),
        "data": {"file": c.data, "sha256": run.train_data.sha256, **st.to_json()},
        "eval_data": ({"file": c.eval_data or f"--eval-split {c.eval_split}",
                       "sha256": run.eval_data.sha256 if c.eval_data else None,
                       "examples": len(run.eval_data)} if run.eval_data is not None else None),
        "epochs": round(step * run.examples_per_step / len(run.train_data), 4),
        "first_loss": history.get("first_loss"), "final_loss": loss,
        "eval_loss": history.get("eval_loss"), "tokens": history.get("tokens"),
        "adaptedit_version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class _Silent:
    def start(self, header, run): ...
    def step(self, rec, total): ...
    def eval(self, step, loss): ...
    def saved(self, step, path): ...
    def end(self, summary): ...
