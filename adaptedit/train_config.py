"""What a training run is set to do: its options, their validation, and the learning-rate schedule.

Options come from defaults < a TOML file (``--config``) < the command line (:func:`make_config`).
The options in :data:`LOCKED` fix the trajectory: ``--resume`` refuses to change them. Paths are
recorded absolute so that a run resumes from any working directory. ``--lr`` defaults to the
method's own (``DEFAULT_LR`` of its module in :mod:`adaptedit.methods`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from adaptedit import checks, methods
from adaptedit.errors import AdapteditError, UsageError

PATHS = ("data", "eval_data", "chat_template")
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
    lr: float | None = None  # default: the method's (method_lr)
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
    """The learning rate used when --lr is not given: the method's ``LR``."""
    return methods.get(method).LR


def method_lr_source(method: str) -> str:
    """Where the method's default learning rate comes from (its paper, or adaptedit)."""
    return methods.get(method).LR_SOURCE or "adaptedit"


def same_file(a: str | None, b: str | None) -> bool:
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
    if cfg.eval_every < 0 or cfg.save_every < 0:
        bad("--eval-every and --save-every must be ≥ 0")
    if cfg.eval_every and not (cfg.eval_data or cfg.eval_split or resume):
        bad("--eval-every needs held-out data to evaluate: add --eval-data FILE or --eval-split "
            "FRACTION")
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


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return base
    p = (step - warmup) / (total - warmup)  # in [0, 1)
    return base * (0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p)
