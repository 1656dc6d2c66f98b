"""`adaptedit eval`: loss and exact match of a model or an adapter on a held-out file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from adaptedit import console
from adaptedit.commands.common import DEVICE, JSON, QUIET, TRUST


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)


def eval_(
    ref: str = typer.Argument(..., metavar="MODEL_OR_ADAPTER", help="A model (hub id, folder, .gguf, smollm2-135m) or an adapter folder (adaptedit or PEFT), evaluated attached, not merged."),
    data: Path = typer.Option(..., "--data", "-d", help="Held-out file (JSONL/JSON/CSV/Parquet; the formats and masking of train)."),
    base: str = typer.Option(None, "--base", "-b", help="Base model of an adapter (default: the one it records)."),
    retain_data: Path = typer.Option(None, "--retain-data", help="General-text file: its loss too, to measure forgetting."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Longest greedy generation per row (default 64)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per forward pass / generation batch."),
    limit: int = typer.Option(None, "--limit", help="Evaluate the first N rows only."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Exact match by greedy generation (--no-generate: loss only)."),
    max_length: int = typer.Option(None, "--max-length", help="Truncate examples to this many tokens (default: train's, 1024)."),
    device: str = DEVICE,
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16/fp16 on GPU) | bf16 | fp16 | fp32."),
    mask_prompt: bool = typer.Option(True, "--mask-prompt/--no-mask-prompt", help="Loss over completions / assistant turns only (default), or every token (as train's --no-mask-prompt)."),
    chat_template: str = typer.Option(None, "--chat-template", help="Jinja chat template file for 'messages' rows (as train's)."),
    show: int = typer.Option(None, "--show", help="Print this many generations with their answers (0: none; default 3; --json has them all)."),
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """Loss per trained token (as train's eval loss) and exact match by greedy generation."""
    from adaptedit.errors import UsageError
    from adaptedit.evaluate import EvalOptions, evaluate

    console.configure(quiet=quiet, json_mode=json_)
    if show is not None and show < 0:
        raise UsageError("--show must be ≥ 0")
    if show is not None and json_:
        raise UsageError("--show picks the generations printed with the table; --json prints them "
                         "all (its 'generations'): drop one of them")
    show = 3 if show is None else show
    if max_new_tokens is not None and not generate:
        raise UsageError("--max-new-tokens applies to generation, which --no-generate turns off; "
                         "drop one of them")
    opts = EvalOptions(max_new_tokens=64 if max_new_tokens is None else max_new_tokens,
                       batch_size=batch_size, limit=limit,
                       generate=generate, max_length=max_length, device=device, dtype=dtype,
                       chat_template=chat_template, mask_prompt=mask_prompt)
    opts.validate()
    names = {"loss": "loss", "retain": "retain loss", "generate": "generating"}
    with console.progress(transient=True) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(names[stage], total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = evaluate(ref, data, opts, base=base, retain_data=retain_data,
                          trust_remote_code=trust_remote_code, progress=progress)
    if json_:
        console.emit_json(result)
        return
    for g in result["generations"][:show]:
        mark = "✓" if g["correct"] else "✗"
        console.show(Text(f"{mark} {g['generation'].strip()[:120]!r}  (answer {g['answer']!r})"))
    table = Table(show_header=False, title="adaptedit eval")
    table.add_column(style="bold")
    table.add_column()
    rows = {"model": result["model"], "adapter": result["adapter"] or "none",
            "data": result["data"], "rows": result["rows"], "trained tokens": result["tokens"],
            "loss": f"{result['loss']:.4f}"}
    if "retain_loss" in result:
        rows["retain loss"] = f"{result['retain_loss']:.4f} ({result['retain_data']})"
    if result["exact_match"] is not None:
        n = result["n_scored"]
        rows["exact match"] = f"{round(result['exact_match'] * n)}/{n} = {result['exact_match']:.1%}"
        if any("####" in g["reference"] for g in result["generations"]):  # GSM8K-style data
            rows["exact match (strict ####)"] = (f"{round(result['exact_match_strict'] * n)}/{n} = "
                                                 f"{result['exact_match_strict']:.1%}")
    elif generate:
        rows["exact match"] = "n/a (no row has a reference answer)"
    for k, v in rows.items():
        table.add_row(k, str(v))
    console.show(table)
