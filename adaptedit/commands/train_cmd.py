"""`adaptedit train`: fine-tune an adapter folder on a data file (see docs/train.md)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from adaptedit import console
from adaptedit.commands.common import JSON, QUIET, TRUST


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    adapter_dir: Path = typer.Argument(..., help="Adapter folder made by `adaptedit init` (trained in place unless -o)."),
    data: str = typer.Option(None, "--data", "-d", help="Training data: .jsonl, .json, .csv or .parquet."),
    eval_data: str = typer.Option(None, "--eval-data", help="Evaluation data file (same formats)."),
    eval_split: float = typer.Option(None, "--eval-split", help="Hold out this fraction of --data for evaluation."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs over --data (instead of --steps)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Examples per micro-batch and process (default: 8)."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (default: 1)."),
    max_length: int = typer.Option(None, "--max-length", help="Truncate examples to this many tokens (default: 1024)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: the method's, LoRA 2e-4, PiSSA 2e-5, MiLoRA 3e-4)."),
    lr_schedule: str = typer.Option(None, "--lr-schedule", help="cosine | linear | constant (default: cosine)."),
    warmup: float = typer.Option(None, "--warmup", help="Warmup steps (≥ 1) or fraction of steps (< 1) (default: 0)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: 0)."),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm; 0 = off (default: 1.0)."),
    mask_prompt: bool = typer.Option(None, "--mask-prompt/--no-mask-prompt", help="Train only on completions / assistant turns (default: mask)."),
    device: str = typer.Option(None, "--device", help="auto (cuda when present), cpu or cuda (default: auto)."),
    dtype: str = typer.Option(None, "--dtype", help="auto | bf16 | fp16 | fp32 (default: auto, bf16 on GPU, fp32 on CPU)."),
    grad_checkpointing: bool = typer.Option(None, "--grad-checkpointing", help="Recompute activations in backward (less memory)."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps (default: start and end only)."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps (default: 100); always at the end."),
    seed: int = typer.Option(None, "--seed", help="Seed for data order and dropout (default: 0)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint, exactly."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (flags win)."),
    show_example: bool = typer.Option(False, "--show-example", help="Print one tokenized example (trained tokens highlighted) and exit."),
    out: Path = typer.Option(None, "--out", "-o", help="Train a copy into this new folder."),
    chat_template: str = typer.Option(None, "--chat-template", help="Jinja chat template file for 'messages' rows."),
    base: str = typer.Option(None, "--base", help="Base model, when not where the adapter records it (a moved folder, a local copy); its weights must match. The trained adapter records it."),
    trust_remote_code: bool = TRUST,
    skip_bad_rows: bool = typer.Option(None, "--skip-bad-rows", help="Skip malformed rows (and count them) instead of stopping."),
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Fine-tune the adapter on a data file; the base model stays frozen and untouched."""
    from adaptedit import train as training
    from adaptedit.devices import Dist
    from adaptedit.train_config import make_config

    console.configure(quiet=quiet, json_mode=json_)
    cli = dict(data=data, eval_data=eval_data, eval_split=eval_split, steps=steps, epochs=epochs,
               batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, lr=lr,
               lr_schedule=lr_schedule, warmup=warmup, weight_decay=weight_decay,
               max_grad_norm=max_grad_norm, mask_prompt=mask_prompt, device=device, dtype=dtype,
               grad_checkpointing=grad_checkpointing, eval_every=eval_every, save_every=save_every,
               seed=seed, chat_template=chat_template, skip_bad_rows=skip_bad_rows)
    cfg, given = make_config(cli, config, resume=resume)  # --resume takes the rest from the run
    if show_example:
        _show_example(adapter_dir, cfg, json_, base, trust_remote_code)
        return
    run = training.prepare(adapter_dir, cfg, given=given, out=out, resume=resume, base=base,
                           trust_remote_code=trust_remote_code)
    dist = Dist()
    if quiet or json_ or not dist.main:
        reporter = Reporter(live=False, verbose=False)
    else:
        reporter = Reporter(live=console.err.is_terminal, verbose=True)
    stop = StopOnSignal()
    try:
        with stop:
            summary = training.train(run, reporter, stop=stop)
    except training.Interrupted as e:
        reporter.close()
        console.warn(f"interrupted at step {e.step}: checkpoint saved in {e.path}; continue with "
                     f"`adaptedit train {adapter_dir}{' -o ' + str(out) if out else ''} --resume`")
        sys.exit(128 + stop.signum)  # 130 after Ctrl-C, 143 after SIGTERM
    finally:
        reporter.close()
    if not dist.main:
        return
    if json_:
        console.emit_json({**summary, "header": run.header()})
        return
    table = Table(show_header=False, title="adaptedit train")
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4f}" if k.endswith("loss") else f"{v:,.1f}"
        table.add_row(k, "–" if v is None else str(v))
    console.show(table)


class StopOnSignal:
    """The ``stop`` callback of a run: the first SIGINT/SIGTERM asks the loop to save a checkpoint
    and stop at the next step; a second one interrupts at once. Handlers are installed only while
    the ``with`` block runs (and only on the main thread), then the previous ones are back."""

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self.old = {}

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        self.old = {}


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Reporter:
    """Live view on a terminal, plain log lines otherwise (stderr); silent when not verbose."""

    def __init__(self, *, live: bool, verbose: bool):
        self.verbose, self.use_live = verbose, live
        self.live = None
        self.last = {}
        self.eval_loss = None
        self.t0 = time.perf_counter()
        self.total = 0
        self.last_line = 0.0

    def start(self, header: dict, run) -> None:
        if not self.verbose:
            return
        table = Table(show_header=False, title="adaptedit train", title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for k, v in header.items():
            table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
        console.err.print(table)
        self.total = run.total_steps
        if self.use_live:
            self.live = Live(self._view(), console=console.err, refresh_per_second=4,
                             transient=False)
            self.live.start()

    def _view(self):
        r = self.last
        t = Table(title="training", title_justify="left")
        for col in ("step", "loss", "eval loss", "lr", "tok/s", "ETA", "peak mem"):
            t.add_column(col, justify="right")
        t.add_row(f"{r.get('step', 0)}/{self.total}",
                  f"{r['loss']:.4f}" if "loss" in r else "-",
                  f"{self.eval_loss:.4f}" if self.eval_loss is not None else "-",
                  f"{r['lr']:.2e}" if "lr" in r else "-",
                  f"{r['tok_s']:.0f}" if "tok_s" in r else "-",
                  _fmt_time(r["eta_s"]) if "eta_s" in r else "-",
                  f"{r['peak_mem_mb']:.0f} MB" if "peak_mem_mb" in r else "-")
        return t

    def step(self, rec: dict, total: int) -> None:
        self.last = rec
        if "eval_loss" in rec:
            self.eval_loss = rec["eval_loss"]
        if not self.verbose:
            return
        if self.live is not None:
            self.live.update(self._view())
            return
        now = time.perf_counter()
        if now - self.last_line < 2.0 and rec["step"] not in (1, total) and "eval_loss" not in rec:
            return  # plain logs: at most one line every 2 s
        self.last_line = now
        ev = f"  eval {self.eval_loss:.4f}" if self.eval_loss is not None else ""
        console.err.print(f"step {rec['step']}/{total}  loss {rec['loss']:.4f}{ev}  lr "
                          f"{rec['lr']:.2e}  tok/s {rec['tok_s']:.0f}  eta {_fmt_time(rec['eta_s'])}"
                          f"  mem {rec['peak_mem_mb']:.0f}MB", highlight=False, soft_wrap=True)

    def eval(self, step: int, loss) -> None:
        self.eval_loss = loss
        if self.verbose and self.live is None and loss is not None:
            console.err.print(f"eval at step {step}: loss {loss:.4f}")
        elif self.live is not None:
            self.live.update(self._view())

    def saved(self, step: int, path) -> None:
        if self.verbose and self.live is None:
            console.err.print(f"saved checkpoint {path}")

    def end(self, summary: dict) -> None:
        self.close()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _show_example(adapter_dir: Path, cfg, json_: bool, base, trust_remote_code: bool) -> None:
    from adaptedit import data
    from adaptedit.binding import base_for
    from adaptedit.formats import load_adapter
    from adaptedit.train_run import TRAIN_BASE_FIX

    adapter = load_adapter(adapter_dir)
    tok = base_for(adapter, base, fix=TRAIN_BASE_FIX, trust_remote_code=trust_remote_code).tokenizer()
    if cfg.chat_template:
        data.set_chat_template(tok, Path(cfg.chat_template))
    example = data.load(Path(cfg.data), tok, max_length=cfg.max_length,
                        mask_prompt=cfg.mask_prompt, skip_bad_rows=cfg.skip_bad_rows, limit=1,
                        skip_hint=True)
    ids, trained = example.example(0)
    ids, trained = ids.tolist(), trained.tolist()
    pieces = [tok.decode([i]) for i in ids]
    if json_:
        console.emit_json({"format": example.stats.format, "tokens": len(ids),
                           "trained_tokens": sum(trained[1:]),
                           "input_ids": ids, "labels": [i if t else -100 for i, t in zip(ids, trained)],
                           "pieces": pieces})
        return
    plain = not console.out.is_terminal
    text = Text()
    for j, (piece, t) in enumerate(zip(pieces, trained)):
        opening = t and (j == 0 or not trained[j - 1])
        closing = t and (j + 1 == len(trained) or not trained[j + 1])
        s = ("⟦" if plain and opening else "") + piece + ("⟧" if plain and closing else "")
        text.append(s, style="bold black on green" if t else "dim")
    console.show(Text(f"{example.stats.format} example from {cfg.data}: {len(ids)} tokens, "
                      f"{sum(trained[1:])} trained (highlighted{', ⟦…⟧' if plain else ''}); the "
                      f"rest has label -100" + ("" if cfg.mask_prompt else " (none: --no-mask-prompt)"),
                      style="bold"))
    console.show(text)
