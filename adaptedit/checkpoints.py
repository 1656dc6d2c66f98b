"""A training run's folder: checkpoints, the trainer state for exact resume, and the metrics log.

    OUT/adaptedit.json, adapter.safetensors      the latest adapter (replaced by atomic renames)
    OUT/metrics.jsonl                            one JSON line per step and per evaluation
    OUT/checkpoints/step-NNNNNN/                 a complete native adapter folder, plus
        trainer_state.safetensors                optimizer moments ("optimizer.<param>.<key>"),
                                                 RNG states as uint8 ("rng.cpu", "rng.cuda.<i>")
        trainer_state.json                       step, data position, schedule, resolved config,
                                                 data statistics

No pickle anywhere. Each checkpoint is written to a temporary folder and renamed
(:func:`adaptedit.atomic.write_atomic_dir`), so a folder named step-NNNNNN is always complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from adaptedit import leftovers
from adaptedit.adapter import CONFIG_NAME, TENSORS_NAME, Adapter, write_adapter_files
from adaptedit.atomic import (file_mode, open_append, refuse_symlink, replace_file,
                              write_atomic_dir)
from adaptedit.errors import AdapteditError

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
METRICS = "metrics.jsonl"


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_dirs(folder: Path, *, with_state: bool = False) -> list[Path]:
    """Checkpoints of ``folder`` that hold a complete adapter (and, ``with_state``, the trainer
    state a resume needs), oldest first; temporary folders are ignored."""
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    need = (CONFIG_NAME, TENSORS_NAME) + ((STATE_JSON,) if with_state else ())
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d{6,}", p.name)
             and all((p / name).exists() for name in need)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_checkpoint(folder: Path, step: int, adapter: Adapter, tensors: dict, state: dict) -> Path:
    """Write checkpoint ``step`` (adapter, trainer state tensors and JSON), then make its adapter
    the folder's own. Returns the checkpoint's path."""
    from safetensors.torch import save_file

    def write(tmp: Path):
        write_adapter_files(adapter, tmp)
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")

    path = checkpoint_path(folder, step)
    write_atomic_dir(path, write, force=True)
    update_adapter_folder(adapter, Path(folder))
    return path


def read_state(checkpoint: Path) -> dict:
    """The trainer state JSON of a checkpoint."""
    return json.loads((Path(checkpoint) / STATE_JSON).read_text(encoding="utf-8"))


def last_intact(folder: Path, check_config) -> tuple[Path, dict, dict]:
    """The newest checkpoint that reads back whole: (its folder, state JSON, state tensors).

    ``check_config(state["config"])`` raises when the saved options do not parse. A checkpoint
    damaged after it was written (a disk error, a hand edit) is skipped with a warning and the run
    resumes from the one before; its step is written again.
    """
    from safetensors.torch import load_file

    from adaptedit import console
    from adaptedit.formats import load_adapter

    ckpts = checkpoint_dirs(folder, with_state=True)
    if not ckpts:
        raise AdapteditError(f"{folder}: --resume found no checkpoint in {folder / CHECKPOINTS}")
    damaged = []
    for last in reversed(ckpts):
        try:
            state = json.loads((last / STATE_JSON).read_text(encoding="utf-8"))
            check_config(state["config"])
            int(state["step"]), state["optimizer"]["param_groups"]  # noqa: B018 (present)
            load_adapter(last)
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
        return last, state, tensors
    raise AdapteditError(f"{folder}: every checkpoint in {folder / CHECKPOINTS} is damaged (newest: "
                         f"{damaged[0]}); start a new run with -o NEW_DIR")


def newest_step(folder: Path) -> int:
    """The step of the newest checkpoint with a trainer state (0: none)."""
    ckpts = checkpoint_dirs(folder, with_state=True)
    return int(ckpts[-1].name[5:]) if ckpts else 0


def save_failed(folder: Path, at: int, last_saved, e: BaseException) -> str:
    """The one-line message when checkpoint ``at`` cannot be written."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(": ", 1)[-1]
    kept = (f"the adapter folder holds step {last_saved}" if last_saved
            else "no checkpoint was written yet")
    return (f"{folder / CHECKPOINTS}: cannot save the checkpoint of step {at} ({why}); {kept}. "
            "Free disk space (or fix permissions) and continue with --resume")


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


def append_metrics(path: Path, rec: dict) -> None:
    """One JSON line; non-finite floats written as strings ("nan", "inf")."""
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


def truncate_metrics(path: Path, step: int) -> None:
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
