"""`adaptedit modules`: list the modules an adapter can target."""

from __future__ import annotations

from collections import Counter

import typer
from rich.table import Table

from adaptedit import console
from adaptedit.commands.common import JSON, QUIET, TARGETS, TRUST
from adaptedit.init import check_stored_shapes
from adaptedit.models import resolve
from adaptedit.targets import select


def register(app: typer.Typer) -> None:
    app.command("modules")(modules)


def modules(
    model: str = typer.Argument(None, help="Hub id, local folder, .gguf file or smollm2-135m (default)."),
    targets: str = TARGETS,
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """List the adaptable modules (Linear and Conv1D, not the output head) of a model."""
    console.configure(quiet=quiet, json_mode=json_)
    source = resolve(model, trust_remote_code=trust_remote_code, quiet=console.quiet())
    ckpt = source.checkpoint
    chosen = select(source.targets, targets)
    check_stored_shapes(source, chosen)  # list the shapes init would build, or say why not
    rows = [{"name": t.name, "kind": t.kind, "out": t.out_features, "in": t.in_features,
             "dtype": str(ckpt.dtype(t.key)).removeprefix("torch."), "key": t.key} for t in chosen]
    by_type = Counter(t.module_type for t in chosen)
    if json_:
        console.emit_json({"model": source.ref, "path": str(source.path), "count": len(rows),
                           "by_type": dict(by_type), "modules": rows})
        return
    table = Table(title=f"{source.ref}: {len(rows)} adaptable modules")
    for col in ("name", "kind", "out × in", "dtype"):
        table.add_column(col, justify="right" if col == "out × in" else "left")
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['out']} × {r['in']}", r["dtype"])
    console.show(table)
    summary = Table(title="per module type")
    for col in ("type", "count", "out × in"):
        summary.add_column(col)
    for typ, n in by_type.items():
        shapes = sorted({f"{t.out_features} × {t.in_features}" for t in chosen if t.module_type == typ})
        summary.add_row(typ, str(n), ", ".join(shapes))
    console.show(summary)
