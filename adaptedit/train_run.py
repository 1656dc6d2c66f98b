"""A training run resolved before its loop: options + adapter + resume state + data → :class:`Run`.

:func:`prepare` checks everything a run needs before any work (the output folder, a checkpoint to
resume and the options it locks, the data, the device) and returns the :class:`Run` that
:func:`adaptedit.train.train` executes; :func:`provenance` is what the trained adapter records.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptedit import __version__, data, leftovers
from adaptedit.adapter import CONFIG_NAME, Adapter, save_adapter
from adaptedit.atomic import check_output
from adaptedit.binding import base_for, check_base
from adaptedit.checkpoints import CHECKPOINTS, checkpoint_dirs, last_intact, newest_step
from adaptedit.devices import Dist, pick_device, pick_dtype
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.formats import load_adapter
from adaptedit.train_config import LOCKED, PATHS, TrainConfig, method_lr, method_lr_source, same_file

TRAIN_BASE_FIX = ("restore that model or give its copy with --base, or run `adaptedit init` on "
                  "this one")


@dataclass
class Run:
    """Everything a run resolved before the loop: shown in the header and saved with checkpoints."""

    folder: Path
    cfg: TrainConfig
    adapter: Adapter
    train_data: data.TokenizedData
    eval_data: data.TokenizedData | None
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
    trust_remote_code: bool = False  # the base's own modelling code (--trust-remote-code)

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
            h["lr_default"] = f"method default ({method_lr_source(a.method)})"
        return h


def prepare(adapter_dir: Path, cfg: TrainConfig, *, given: set | None = None,
            out: Path | None = None, resume: bool = False, tokenizer=None, base: str | None = None,
            trust_remote_code: bool = False) -> Run:
    """Resolve the run: adapter, output folder, resume state, tokenizer, data, steps, device.

    ``base`` (--base) replaces the base the adapter records (a moved folder, a local copy of a hub
    model): its targeted weights must be the ones the adapter was made for, and the adapter then
    records it, so that later commands (and --resume) find it without --base."""
    dist = Dist()
    given = given if given is not None else set(TrainConfig.names())
    adapter_dir = Path(adapter_dir)
    folder = Path(out) if out else adapter_dir
    state, state_tensors, start = {}, {}, 0
    if dist.main and folder.is_dir():  # temporary files of runs that were killed
        leftovers.clean(folder)
        leftovers.clean(folder / CHECKPOINTS)
    copy_made = False  # -o NEW written by an earlier attempt that stopped before a checkpoint
    if resume and not checkpoint_dirs(folder, with_state=True) and (folder / CONFIG_NAME).exists():
        # the run stopped before its first checkpoint: there is nothing to continue, so it
        # starts at step 0 (θ is still θ₀: the folder changes only with a checkpoint)
        if not cfg.data:
            raise UsageError(f"{folder}: --resume found no checkpoint (the run stopped before its "
                             "first one), so it starts at step 0: give --data and the run's "
                             "options again")
        resume, copy_made = False, out is not None
    if resume:
        last, state, state_tensors = last_intact(folder, lambda c: TrainConfig(**c))
        saved = TrainConfig(**state["config"])
        adapter = load_adapter(last)
        if saved.lr is None:  # runs record the method's default as "no --lr"
            saved.lr = method_lr(adapter.config.method)
        changed = [k for k in LOCKED if k in given and getattr(cfg, k) != getattr(saved, k)
                   and not (k in PATHS and same_file(getattr(cfg, k), getattr(saved, k)))]
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
        if checkpoint_dirs(folder, with_state=True):
            raise AdapteditError(f"{folder}: holds checkpoints of an earlier run; pass --resume to "
                                 "continue it, or -o NEW_DIR to train a copy")
    if adapter.config.source != "adaptedit":
        raise AdapteditError(f"{adapter_dir}: an imported {adapter.config.source} adapter; convert "
                             "it to a native adapter folder before training")
    if base is not None:
        rebase(adapter, base, trust_remote_code)
    if dist.main:
        writable = folder
        while not writable.is_dir() and writable != writable.parent:
            writable = writable.parent  # -o NEW/DIR: the folder it will be created in
        _check_writable(writable)
    device = pick_device(cfg.device, dist)
    dtype = pick_dtype(cfg.dtype, device)
    if tokenizer is None:
        source = base_for(adapter, None, fix=TRAIN_BASE_FIX, trust_remote_code=trust_remote_code)
        tokenizer = source.tokenizer()
    if cfg.chat_template:
        data.set_chat_template(tokenizer, Path(cfg.chat_template))
    load = dict(max_length=cfg.max_length, mask_prompt=cfg.mask_prompt,
                skip_bad_rows=cfg.skip_bad_rows, skip_hint=True)
    train_data = data.load(Path(cfg.data), tokenizer, **load)
    eval_data = None
    if cfg.eval_data:
        eval_data = data.load(Path(cfg.eval_data), tokenizer, **load)
    elif cfg.eval_split:
        train_data, eval_data = data.split(train_data, cfg.eval_split, cfg.seed)
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
    return Run(folder, cfg, adapter, train_data, eval_data, total, warm, lr, device, dtype,
               dist.world, start, state, state_tensors, newest_step=newest_step(folder),
               trust_remote_code=trust_remote_code)


def rebase(adapter: Adapter, base: str, trust_remote_code: bool = False) -> None:
    """Point the adapter (in memory) at ``base`` after checking that its targeted weights are the
    ones the adapter was made for (the fingerprints recorded at init)."""
    source = base_for(adapter, base, trust_remote_code=trust_remote_code)
    check_base(adapter, source, fix="give the base this adapter was made for, or run "
                                    "`adaptedit init` on this one")
    adapter.config.base = {"ref": source.ref, "path": str(source.path), "kind": source.kind}


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


def _inputs_of(adapter: Adapter, adapter_dir: Path, cfg: TrainConfig) -> list:
    """What a run reads: the adapter folder, the data files, the template, the base folder."""
    base = adapter.config.base
    return [adapter_dir, cfg.data, cfg.eval_data, cfg.chat_template,
            base.get("path") if base.get("kind") == "folder" else None]


def provenance(run: Run, step: int, loss, history: dict) -> dict:
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
