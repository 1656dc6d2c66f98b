"""Data rows: read JSONL / JSON / CSV / Parquet files row by row, and check each row's format.

Three row formats (see :mod:`adaptedit.data` for how each is tokenized and masked):

    {"text": "..."}
    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": ..., "content": ...}, ...]}

Rows are streamed (JSONL, CSV line by line; Parquet batch by batch). A JSON list file is parsed
whole (a JSON array cannot be streamed without a streaming parser); use JSONL for large data.
A malformed row raises :class:`BadRow` with what is wrong; the caller adds the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator

from adaptedit.errors import AdapteditError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}
BOM = b"\xef\xbb\xbf"
CSV_FIELD_MAX = 2**31 - 1  # csv's C limit (a long on every platform)


class BadRow(Exception):
    """A malformed row: the message says what is wrong (the caller adds file and line)."""


# ---------------------------------------------------------------------------------------- reading


def read_rows(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, raw row) from a data file; the row is whatever the file holds.

    Unparseable rows are yielded as ``BadRow`` instances so that the caller can skip or stop.
    Line numbers: JSONL/JSON/CSV the 1-based line where the row starts; Parquet the 1-based row.
    """
    path = Path(path)
    if path.is_dir():
        raise AdapteditError(f"{path}: a folder, not a data file; give the file itself (.jsonl, "
                             ".json, .csv or .parquet)")
    if not path.is_file():
        raise AdapteditError(f"{path}: no such data file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise AdapteditError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json, "
                             ".csv or .parquet")
    if kind == "json" and _first_char(path) != "[":
        kind = "jsonl"  # a .json file that holds one object per line
    return {"jsonl": _jsonl, "json": _json_list, "csv": _csv, "parquet": _parquet}[kind](path)


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM is not content
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            s = chunk.lstrip()
            if s:
                return s[0]


def _jsonl(path: Path):
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw)
            except UnicodeDecodeError:
                yield n, BadRow("not valid UTF-8")
            except json.JSONDecodeError as e:
                yield n, BadRow(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_list(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise AdapteditError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8"
                             ) from None
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    line, pos = 1, 0

    def line_at(k):
        nonlocal line, pos
        line += text.count("\n", pos, k)
        pos = k
        return line

    def skip(k):
        while k < len(text) and text[k] in " \t\r\n":
            k += 1
        return k

    i = skip(i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        i = skip(i)
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise AdapteditError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "a broken JSON list cannot be skipped row by row") from None
        yield line_at(i), obj
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            rest = skip(i + 1)
            if rest < len(text):
                raise AdapteditError(f"{path}:{line_at(rest)}: text after the end of the JSON list "
                                     f"({text[rest:rest + 20].strip()!r}); remove it, or fix the list")
            return
        raise AdapteditError(f"{path}:{line_at(i)}: invalid JSON list (expected ',' or ']')")


def _csv(path: Path):
    limit = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_MAX)  # a long text in one cell is valid (default 128 KiB)
    try:
        yield from _csv_rows(path)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            fieldnames = reader.fieldnames
        except UnicodeDecodeError as e:
            raise AdapteditError(f"{path}:1: the CSV header is not valid UTF-8 (byte {e.start}); "
                                 "save the file as UTF-8") from None
        except csv.Error as e:
            raise AdapteditError(f"{path}:1: unreadable CSV header ({e})") from None
        if fieldnames is None:
            return
        if None in reader.fieldnames or "" in reader.fieldnames:
            raise AdapteditError(f"{path}:1: CSV header has an empty column name")
        start = reader.line_num + 1
        try:
            for row in reader:
                if None in row:
                    yield start, BadRow(f"{len(reader.fieldnames) + len(row[None])} fields, "
                                        f"the header has {len(reader.fieldnames)}")
                elif any(v is None for v in row.values()):
                    yield start, BadRow(f"fewer fields than the header's {len(reader.fieldnames)}")
                else:
                    if "messages" in row:
                        try:
                            row["messages"] = json.loads(row["messages"])
                        except json.JSONDecodeError as e:
                            yield start, BadRow(f"column messages is not JSON ({e.msg})")
                            start = reader.line_num + 1
                            continue
                    yield start, row
                start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise AdapteditError(f"{path}:{reader.line_num + 1}: not valid UTF-8 (byte "
                                 f"{e.start} of a read block); save the file as UTF-8") from None
        except csv.Error as e:
            raise AdapteditError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AdapteditError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:
        raise AdapteditError(f"{path}: unreadable Parquet file ({str(e).splitlines()[0]})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- checking


def row_format(row) -> str:
    """The format of one row, or BadRow saying what is wrong with it."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    found = [f for f, keys in (("text", ("text",)), ("prompt-completion", ("prompt", "completion")),
                               ("messages", ("messages",))) if any(k in row for k in keys)]
    if not found:
        raise BadRow(f"no 'text', 'prompt'/'completion' or 'messages' field (fields: "
                     f"{', '.join(map(str, list(row)[:6])) or 'none'})")
    if len(found) > 1:
        raise BadRow(f"ambiguous row: has fields of several formats ({', '.join(found)})")
    fmt = found[0]
    if fmt == "text":
        _check_str(row, "text", allow_empty=False)
    elif fmt == "prompt-completion":
        for k, other in (("prompt", "completion"), ("completion", "prompt")):
            if k not in row:
                raise BadRow(f"has '{other}' but no '{k}' field (prompt-completion rows need both)")
        _check_str(row, "prompt", allow_empty=True)
        _check_str(row, "completion", allow_empty=False)
    else:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRow("'messages' must be a non-empty list of {role, content} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadRow(f"messages[{j}] must be an object with 'role' and 'content'")
            if not isinstance(m["role"], str) or not m["role"]:
                raise BadRow(f"messages[{j}].role must be a non-empty string")
            if not isinstance(m["content"], str):
                raise BadRow(f"messages[{j}].content must be a string, got "
                             f"{type(m['content']).__name__}")
    return fmt


def _check_str(row, key, allow_empty):
    v = row[key]
    if not isinstance(v, str):
        raise BadRow(f"'{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise BadRow(f"'{key}' is empty")


# -------------------------------------------------------------------------------------- tokenizing
