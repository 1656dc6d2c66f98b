"""`adaptedit compare`: adapter methods trained and evaluated as one controlled experiment."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from adaptedit import console
from adaptedit.errors import UsageError
from adaptedit.commands.common import DEVICE, JSON, QUIET, TARGETS, TRUST


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def _ints(text: str, name: str) -> list:
    try:
        vals = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{name} {text!r}: not a comma list of integers") from None
    if not vals:
        raise UsageError(f"{name}: empty list; e.g. {name} 1,2,3")
    return vals


def compare(
    model: str = typer.Argument(None, help="Base model: hub id, folder, .gguf or smollm2-135m (default)."),
    data: str = typer.Option(..., "--data", "-d", help="Training data (the formats of train)."),
    eval_data: str = typer.Option(..., "--eval-data", help="Validation data: eval loss, and the best lr of each method."),
    test_data: str = typer.Option(None, "--test-data", help="Test data: loss and exact match of every run (never used to choose)."),
    retain_data: str = typer.Option(None, "--retain-data", help="General text: forgetting = retain loss − the base model's."),
    methods_: str = typer.Option("lora,pissa", "--methods", "-m", help="Comma list of init's methods, each optionally +dora (e.g. lora,pissa,lora+dora)."),
    rank: int = typer.Option(None, "--rank", "-r", help="Rank of every method (default: each method's own, as init; refused when a method has no rank, e.g. ia3, road; --budget params adapts it)."),
    alpha: float = typer.Option(None, "--alpha", help="α for every method (default: each method's)."),
    lr: str = typer.Option(None, "--lr", help="Comma list of learning rates (default: each method's)."),
    seeds: str = typer.Option("0", "--seeds", help="Comma list of seeds (data order and random init)."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps per run (default: one epoch)."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs per run (instead of --steps)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Examples per step."),
    max_length: int = typer.Option(1024, "--max-length", help="Truncate examples to this many tokens."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (default: start and end)."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps (default: --eval-every, else 100)."),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="cosine | linear | constant."),
    warmup: float = typer.Option(0.0, "--warmup", help="Warmup steps (≥ 1) or fraction (< 1)."),
    budget: str = typer.Option("rank", "--budget", help="rank: one rank; params: ranks matched to the first method's parameter count (a method that cannot come within ±20%, e.g. one without a rank, is refused)."),
    method_option: list[str] = typer.Option(None, "--method-option", help="METHOD:KEY=VALUE, e.g. pissa:lr=2e-5,5e-5 or delora:delora_lambda=10 (repeatable)."),
    targets: str = TARGETS,
    svd: str = typer.Option("full", "--svd", help="SVD of PiSSA's init: full (exact, shared by all runs) | randomized | auto."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Longest generation for exact match on --test-data (default 16)."),
    test_limit: int = typer.Option(None, "--test-limit", help="Evaluate the first N test rows only."),
    chat_template: str = typer.Option(None, "--chat-template", help="Jinja chat template file for 'messages' rows (training and evaluation)."),
    jobs: int = typer.Option(1, "--jobs", help="Runs at once, one per GPU (1 on CPU)."),
    device: str = DEVICE,
    dtype: str = typer.Option("auto", "--dtype", help="auto | bf16 | fp16 | fp32."),
    out: Path = typer.Option(..., "--out", "-o", help="Comparison folder (RUN_DIR)."),
    resume: bool = typer.Option(False, "--resume", help="Keep finished runs, continue an interrupted one from its checkpoint."),
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """Train several adapter methods under identical conditions and report them side by side."""
    from adaptedit.compare import CompareOptions, compare as run_compare, parse_floats

    console.configure(quiet=quiet, json_mode=json_)
    if max_new_tokens is not None and test_data is None:
        raise UsageError("--max-new-tokens applies to --test-data, which is not given; add "
                         "--test-data FILE or drop --max-new-tokens")
    opts = CompareOptions(
        data=data, eval_data=eval_data, model=model, test_data=test_data, retain_data=retain_data,
        methods=[m.strip() for m in methods_.split(",") if m.strip()], rank=rank, alpha=alpha,
        lrs=parse_floats(lr, "--lr") if lr is not None else None, seeds=_ints(seeds, "--seeds"),
        steps=steps, epochs=epochs, batch_size=batch_size, max_length=max_length,
        eval_every=eval_every, save_every=save_every, lr_schedule=lr_schedule, warmup=warmup,
        targets=targets, svd=svd, budget=budget, method_options=list(method_option or []),
        max_new_tokens=16 if max_new_tokens is None else max_new_tokens, test_limit=test_limit, device=device, dtype=dtype,
        jobs=jobs, chat_template=chat_template)
    live = LiveTable(enabled=not (quiet or json_))
    try:
        result = run_compare(opts, out=out, resume=resume, progress=live,
                             trust_remote_code=trust_remote_code)
    finally:
        live.close()
    if json_:
        console.emit_json({"folder": str(result.folder), "summary": result.summary,
                           "files": result.files})
        return
    from adaptedit.compare_report import COLUMNS, markdown_table, table_rows

    if console.out.is_terminal:
        t = Table(title=f"adaptedit compare: {out}", title_justify="left")
        for c in COLUMNS:
            t.add_column(c, justify="left" if c == "method" else "right")
        for row in table_rows(result.summary):
            t.add_row(*row)
        console.show(t)
    else:  # piped: one unwrapped line per method
        console.show(Text(markdown_table(COLUMNS, table_rows(result.summary))))
    console.note(f"report: {result.files['report.html']} (and report.md, summary.json, "
                 f"results.jsonl, PNGs in {out})")


def _size(v: dict) -> str:
    """"r=8 (1,234 params)", "no rank (1,234 params)", with the budget ratio under --budget params."""
    head = f"r={v['rank']}" if v["rank"] is not None else "no rank"
    b = v.get("budget")
    tail = f", {b['ratio']:.2f}× budget: {b['how']}" if b and b.get("ratio") is not None else ""
    return f"{head} ({v['params']:,} params{tail})"


class LiveTable:
    """Runs done / running / left with an ETA, on stderr (a live table on a terminal, else one
    line per run and every ~10 s of steps)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.total = self.done = self.left = 0
        self.current, self.step, self.t0, self.last = "", "", time.perf_counter(), 0.0
        self.finished_s = []
        self.live = None

    def _eta(self) -> str:
        if not self.finished_s:
            return "?"
        s = int(sum(self.finished_s) / len(self.finished_s) * self.left)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    def _view(self):
        t = Table(title="adaptedit compare", title_justify="left")
        for c in ("done", "running", "step", "left", "ETA"):
            t.add_column(c, justify="right")
        t.add_row(f"{self.done}/{self.total}", self.current or "-", self.step or "-",
                  str(self.left), self._eta())
        return t

    def __call__(self, event: str, info: dict) -> None:
        if not self.enabled:
            return
        if event == "plan":
            self.total, self.done, self.left = len(info["runs"]), info["done"], info["todo"]
            console.err.print(f"compare: {self.total} runs ({info['done']} already done), "
                              + ", ".join(f"{k} {_size(v)} lr "
                                          + "/".join(f"{x:g}" for x in v["lrs"])
                                          for k, v in info["methods"].items()),
                              highlight=False, soft_wrap=True)
            if console.err.is_terminal:
                self.live = Live(self._view(), console=console.err, refresh_per_second=2)
                self.live.start()
            return
        if event == "run_start":
            self.current, self.step, self.run_t0 = info["run"], "", time.perf_counter()
            self.left -= 1
        elif event == "step":
            self.step = f"{info['step']}/{info['total']} loss {info['loss']:.3f}"
            if self.live is None and time.perf_counter() - self.last < 10:
                return
        elif event == "run_end":
            self.done += 1
            self.finished_s.append(info["record"]["seconds"])
            r = info["record"]
            self.step = (f"diverged ({r['diverged']})" if r.get("diverged")
                         else f"eval {r['final_eval_loss']:.4f}")
        else:
            return
        self.last = time.perf_counter()
        if self.live is not None:
            self.live.update(self._view())
        else:
            console.err.print(f"[{self.done} done, {self.left} left, ETA {self._eta()}] "
                              f"{self.current}: {self.step}", highlight=False, soft_wrap=True)

    def close(self):
        if self.live is not None:
            self.live.stop()
            self.live = None
