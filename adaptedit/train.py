"""Fine-tune an adapter: one training loop, atomic checkpoints, exact resume (``adaptedit train``).

The base model stays frozen and untouched; AdamW updates θ (``layer.trainable_parameters``) only.
One optimizer step consumes G = batch × grad_accum × world examples from a seeded stream
(:class:`adaptedit.data.Stream`), so the whole data position is the step number. The loss is the
mean cross-entropy over the step's trained tokens (token-weighted across micro-batches and ranks),
computed on trained positions only (:mod:`adaptedit.loss`).

    prepare()  options (train_config.py) + adapter + resume state + data → Run
    train()    the loop: [stop?] → optimizer step → [eval] → log → [checkpoint], then eval + save

Checkpoints, the trainer state and the metrics log: :mod:`adaptedit.checkpoints`. Devices and data
parallelism under ``torchrun``: :mod:`adaptedit.devices`. The library never installs signal
handlers: the command passes ``stop``, a callable that Ctrl-C/SIGTERM sets.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adaptedit import __version__, data
from adaptedit.atomic import folder_lock, refuse_symlink
from adaptedit.binding import base_for, check_base
from adaptedit.checkpoints import (CHECKPOINTS, METRICS, append_metrics, checkpoint_path,
                                   load_optimizer, newest_step, optimizer_tensors, rng_tensors,
                                   save_failed, set_rng, truncate_metrics, write_checkpoint)
from adaptedit.devices import Dist, autocast, peak_memory_mb, sum_grads
from adaptedit.errors import AdapteditError
from adaptedit.layer import adapted_layers, attach, collect, penalty
from adaptedit.loss import TrainedPositions, loss_sum, trained_tokens
from adaptedit.train_config import lr_at
from adaptedit.train_run import (TRAIN_BASE_FIX, Run, prepare,  # noqa: F401 (train.prepare: API)
                                 provenance)

PAD_ID = 0  # padded positions are masked (attention 0, label −100): the id never matters


class Interrupted(Exception):
    """``stop`` asked the loop to end: a checkpoint was saved at ``step``."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint {path}")
        self.step, self.path = step, path


class Diverged(AdapteditError):
    """The loss or the gradient norm became non-finite at ``step`` (the message says what to try)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ------------------------------------------------------------------------------------ the loop


def train(run: Run, reporter=None, *, model=None, stop=None) -> dict:
    """The training loop. ``stop``, if given, is called before every step; when it returns true
    (on any process) a checkpoint is saved and :class:`Interrupted` raised. Returns the summary;
    raises AdapteditError on a non-finite loss or gradient norm.

    One writer per adapter folder: the main process holds the folder's lock for the whole run
    (a second run is refused naming this one's pid; a lock left by a dead process is taken over).
    """
    refuse_symlink(run.folder / CHECKPOINTS)
    refuse_symlink(run.folder / METRICS)
    with folder_lock(run.folder, "train", held=Dist().main):
        _unchanged_since_prepare(run)
        return _train(run, reporter, model=model, stop=stop)


def _unchanged_since_prepare(run: Run) -> None:
    """Refuse when another run saved checkpoints between :func:`prepare` and the lock."""
    last = newest_step(run.folder)
    if last != (run.newest_step if run.newest_step is not None else run.start_step):
        raise AdapteditError(f"{run.folder}: another run saved checkpoint step {last} after this one "
                             "started; nothing was changed: rerun (--resume continues from it)")


def _train(run: Run, reporter=None, *, model=None, stop=None) -> dict:
    cfg, dist = run.cfg, Dist()
    dist.start(run.device)
    rep = reporter or _Silent()
    torch.manual_seed(cfg.seed)
    loop = _Loop(run, model if model is not None else _load_model(run), dist, rep)
    rep.start(run.header(), run)
    dist.barrier()
    if loop.step == 0 and run.eval_data is not None:
        loop.evaluate_and_log()
    while loop.step < run.total_steps:
        if _stop_requested(stop, dist, run.device):  # every process stops at the same step
            loop.save_unless_saved()
            raise Interrupted(loop.step, checkpoint_path(run.folder, loop.step))
        rec = loop.optimizer_step()
        if cfg.eval_every and loop.step % cfg.eval_every == 0 and loop.step < run.total_steps:
            loop.history["eval_loss"] = rec["eval_loss"] = loop.evaluate()
        loop.log(rec)
        rep.step(rec, run.total_steps)
        if loop.step < run.total_steps and cfg.save_every and loop.step % cfg.save_every == 0:
            loop.save(loop.step, rec["loss"])
    if run.eval_data is not None and loop.steps_done:
        loop.evaluate_and_log()
    loop.save(loop.step, loop.history["loss"])
    loop.positions.handle.remove()
    summary = loop.summary()
    rep.end(summary)
    dist.stop()
    return summary


def _load_model(run: Run):
    source = base_for(run.adapter, None, fix=TRAIN_BASE_FIX,
                      trust_remote_code=run.trust_remote_code)
    check_base(run.adapter, source, fix=TRAIN_BASE_FIX)
    return source.load(dtype=run.dtype, device=run.device)


def _stop_requested(stop, dist: Dist, device) -> bool:
    flag = torch.tensor([float(bool(stop())) if stop is not None else 0.0], device=device)
    return float(dist.sum(flag)) > 0


class _Loop:
    """One run's training state: the adapted model, AdamW, the data stream and the history."""

    def __init__(self, run: Run, model, dist: Dist, rep):
        cfg = run.cfg
        self.run, self.cfg, self.model, self.dist, self.rep = run, cfg, model, dist, rep
        attach(model, run.adapter)
        if cfg.grad_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.positions = TrainedPositions(model)
        layers = adapted_layers(model)
        self.names = [f"{n}.{k}" for n, layer in layers.items() for k in layer.params]
        self.params = [p for layer in layers.values() for p in layer.params.values()]
        self.opt = torch.optim.AdamW(self.params, lr=run.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=cfg.weight_decay)
        self.fp16 = run.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=self.fp16)
        self.step = run.start_step
        if run.state:
            load_optimizer(self.opt, self.names, run.state_tensors, run.state["optimizer"],
                           run.device)
            set_rng(run.state_tensors)
            if self.fp16 and run.state.get("scaler"):
                self.scaler.load_state_dict(run.state["scaler"])
        self.stream = data.Stream(run.train_data, cfg.seed)
        self.metrics = run.folder / METRICS
        if dist.main:
            truncate_metrics(self.metrics, self.step)
        self.history = {"loss": None, "eval_loss": None,
                        "last_saved": self.step if run.state else None,
                        "tokens": int(run.state.get("tokens", 0)),
                        "first_loss": run.state.get("first_loss")}
        self.t_start, self.steps_done = time.perf_counter(), 0

    def optimizer_step(self) -> dict:
        """One optimizer step over G examples; returns its metrics record."""
        run, cfg, dist = self.run, self.cfg, self.dist
        t0 = time.perf_counter()
        lr = lr_at(self.step, run.total_steps, run.lr, cfg.lr_schedule, run.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        micro = self._micro_batches()
        counts = torch.tensor([float(sum(trained_tokens(m) for m in micro)),
                               float(sum(int(m["attention_mask"].sum()) for m in micro))],
                              dtype=torch.float64, device=run.device)
        dist.sum(counts)  # trained tokens and all tokens of the whole step, every rank
        loss = self._backward(micro, counts[0])
        gnorm = self._clip_gradients()
        self._refuse_non_finite(loss, gnorm, lr)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_done += 1
        h = self.history
        h["loss"] = loss
        h["first_loss"] = h["first_loss"] if h["first_loss"] is not None else loss
        h["tokens"] += int(counts[1])
        dt = time.perf_counter() - t0
        elapsed = time.perf_counter() - self.t_start
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                "tokens": int(counts[1]), "trained_tokens": int(counts[0]),
                "tok_s": counts[1].item() / dt, "step_s": dt,
                "eta_s": elapsed / self.steps_done * (run.total_steps - self.step),
                "peak_mem_mb": peak_memory_mb(run.device)}

    def _micro_batches(self) -> list:
        """This process's grad_accum micro-batches of the step (the stream position is the step)."""
        b, k = self.cfg.batch_size, self.cfg.grad_accum
        first = self.step * self.run.examples_per_step + self.dist.rank * k * b
        return [self.stream.batch(first + j * b, b, PAD_ID) for j in range(k)]

    def _backward(self, micro: list, n_trained: torch.Tensor) -> float:
        """Gradients of the step's mean loss per trained token; returns that loss."""
        total_loss = torch.zeros((), dtype=torch.float64, device=self.run.device)
        for m in micro:
            with autocast(self.run.device, self.run.dtype):
                s = loss_sum(self.model, self.positions, m, self.run.device)
            self.scaler.scale(s / n_trained.float()).backward()
            total_loss += s.detach().double()
        reg = penalty(self.model)  # a method's regulariser (HRA's λ‖I − ÛᵀÛ‖²), once per step
        if reg is not None:
            self.scaler.scale(reg / self.dist.world).backward()  # summed over ranks with the grads
        loss = float(self.dist.sum(total_loss) / n_trained)
        if self.dist.world > 1:
            sum_grads(self.params, self.dist)
        return loss

    def _clip_gradients(self) -> float:
        """Unscale, clip to --max-grad-norm (0: no clipping); returns the norm before clipping."""
        self.scaler.unscale_(self.opt)
        if self.cfg.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        return float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))

    def _refuse_non_finite(self, loss: float, gnorm: float, lr: float) -> None:
        if math.isfinite(loss) and (self.fp16 or math.isfinite(gnorm)):
            return
        cfg, run = self.cfg, self.run
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        value = loss if not math.isfinite(loss) else gnorm
        self.log({"step": self.step + 1, "loss": loss, "grad_norm": gnorm, "lr": lr,
                  "error": f"non-finite {what}"})
        last = self.history["last_saved"]
        kept = (f"the adapter folder holds step {last} (the last checkpoint)") if last else \
            "the adapter folder is unchanged (no checkpoint was written yet)"
        raise Diverged(
            f"{what} is {value} at step {self.step + 1} (lr {lr:.3g}); stopped, {kept}. Try a "
            "lower --lr" + (", --max-grad-norm 1.0" if not cfg.max_grad_norm else "")
            + (", or --dtype fp32" if run.dtype != torch.float32 else "")
            + (" or --warmup 0.1" if not run.warmup_steps else ""), self.step + 1)

    def evaluate(self) -> float | None:
        """Mean loss per trained token over the eval data (shared out over the processes)."""
        run, dist = self.run, self.dist
        if run.eval_data is None:
            return None
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=run.device)
        with torch.no_grad(), autocast(run.device, run.dtype):
            for i, batch in enumerate(data.batches(run.eval_data, self.cfg.batch_size, PAD_ID)):
                if i % dist.world == dist.rank:
                    tot[0] += loss_sum(self.model, self.positions, batch, run.device).double()
                    tot[1] += trained_tokens(batch)
        self.model.train()
        dist.sum(tot)
        return float(tot[0] / tot[1])

    def evaluate_and_log(self) -> None:
        self.history["eval_loss"] = self.evaluate()
        self.rep.eval(self.step, self.history["eval_loss"])
        self.log({"step": self.step, "eval_loss": self.history["eval_loss"]})

    def log(self, rec: dict) -> None:
        if self.dist.main:
            append_metrics(self.metrics, rec)

    def save(self, at: int, loss) -> None:
        """Checkpoint ``at`` (main process) and make it the adapter folder's content."""
        run, cfg = self.run, self.cfg
        if self.dist.main:
            adapter = collect(self.model, run.adapter)
            adapter.config.training = provenance(run, at, loss, self.history)
            tensors, opt_meta = optimizer_tensors(self.opt, self.names)
            tensors.update(rng_tensors())
            g = run.examples_per_step
            state = {"step": at, "position": at * g, "epoch": at * g / len(run.train_data),
                     "total_steps": run.total_steps, "world_size": run.world,
                     "optimizer": opt_meta,
                     "scheduler": {"kind": cfg.lr_schedule, "base_lr": run.lr,
                                   "warmup_steps": run.warmup_steps,
                                   "total_steps": run.total_steps,
                                   "lr": lr_at(max(at - 1, 0), run.total_steps, run.lr,
                                               cfg.lr_schedule, run.warmup_steps)},
                     "scaler": self.scaler.state_dict() if self.fp16 else None,
                     "config": asdict(cfg), "data_sha256": run.train_data.sha256,
                     "data_stats": run.train_data.stats.to_json(),
                     "tokens": self.history["tokens"], "first_loss": self.history["first_loss"],
                     "loss": loss, "adaptedit_version": __version__}
            try:
                path = write_checkpoint(run.folder, at, adapter, tensors, state)
            except (OSError, AdapteditError) as e:
                raise AdapteditError(save_failed(run.folder, at, self.history["last_saved"],
                                                 e)) from None
            self.history["last_saved"] = at
            self.rep.saved(at, path)
        self.dist.barrier()

    def save_unless_saved(self) -> None:
        if self.history["last_saved"] != self.step:
            self.save(self.step, self.history["loss"])

    def summary(self) -> dict:
        run, h = self.run, self.history
        elapsed = time.perf_counter() - self.t_start
        return {"adapter": str(run.folder), "steps": self.step, "final_loss": h["loss"],
                "first_loss": h["first_loss"], "eval_loss": h["eval_loss"],
                "tokens": h["tokens"], "seconds": round(elapsed, 2),
                "tok_s": h["tokens"] / elapsed if elapsed and self.steps_done else None,
                "peak_mem_mb": round(peak_memory_mb(run.device), 1),
                "checkpoint": str(checkpoint_path(run.folder, self.step))}


class _Silent:
    def start(self, header, run): ...
    def step(self, rec, total): ...
    def eval(self, step, loss): ...
    def saved(self, step, path): ...
    def end(self, summary): ...
