"""Training data: rows (read and checked by :mod:`adaptedit.rows`) tokenized and masked.

Three row formats, detected per file from the first row and checked on every row:

    {"text": "..."}                                   every token is trained
    {"prompt": "...", "completion": "..."}            completion (+ EOS) trained, prompt masked
    {"messages": [{"role": ..., "content": ...}, ...]} rendered with the tokenizer's chat template;
                                                      assistant turns (with their end-of-turn
                                                      token) trained, everything else masked

Masked positions carry the label −100 (``IGNORE``). Chat masking renders the conversation
incrementally: the assistant turn i spans from the end of ``render(messages[:i],
add_generation_prompt=True)`` to the end of ``render(messages[:i+1])`` (trailing whitespace
excluded), both of which must be prefixes of the full rendering. Templates with ``{% generation %}``
blocks use the tokenizer's own ``return_assistant_tokens_mask`` instead.

Rows are streamed (JSONL, CSV line by line; Parquet batch by batch) and turned into token ids at
once, so memory holds token ids (int32), never the parsed rows. A JSON list file is parsed whole (a
JSON array cannot be streamed without a streaming parser); use JSONL for large data.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptedit.errors import AdapteditError
from adaptedit.rows import BadRow, read_rows, row_format, sha256_file

IGNORE = -100
FORMATS = ("text", "prompt-completion", "messages")
# the roles chat templates know (OpenAI's and Hugging Face's conventions); other roles must appear in
# the chat template itself, else they are taken for a typo
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# bounded tokenization of long rows (Tokenize._encode)
PREFIX_CHARS = 8  # characters per token in the first prefix (most tokenizers average 3-5)
PREFIX_SLACK = 1024  # characters kept clear between the last kept token and the cut
PREFIX_SLACK_TOKENS = 64  # the same margin in tokens, for slow tokenizers (no offsets)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def set_chat_template(tokenizer, path: Path) -> None:
    """Use the Jinja template in ``path`` (or the "chat_template" of a JSON file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AdapteditError(f"--chat-template {path}: cannot read ({e.strerror or e})") from None
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AdapteditError(f"--chat-template {path}: a JSON file must hold "
                                 '{"chat_template": "..."}') from None
    tokenizer.chat_template = text


def template_names_role(template: str, role: str) -> bool:
    """True when the chat template names ``role`` as a whole word: a quoted string ('observation')
    or a tag (<|observation|>), not any substring (the role "e")."""
    r = re.escape(role)
    return re.search(rf"""(['"]){r}\1|<\|{r}\|>""", template) is not None


class Tokenize:
    """Turn one checked row into (input_ids, trained) lists, following the masking rules."""

    def __init__(self, tokenizer, *, mask_prompt: bool = True, max_length: int | None = None):
        self.tok = tokenizer
        self.mask_prompt = mask_prompt
        self.max_length = max_length  # tokens beyond it are never computed (see _encode)
        self.cut = False  # the last row was longer than max_length tokens
        self.eos = tokenizer.eos_token_id
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        tpl = getattr(tokenizer, "chat_template", None)
        self.template = tpl if isinstance(tpl, str) else None
        self.generation_tags = bool(self.template and GENERATION_TAG.search(self.template))

    def __call__(self, fmt: str, row: dict) -> tuple[list[int], list[bool]]:
        self.cut = False
        if fmt == "text":
            ids, trained = self._spans(row["text"], [(0, len(row["text"]))], special=True)
            return self._eos(ids, trained, True)
        if fmt == "prompt-completion":
            p, c = row["prompt"], row["completion"]
            ids, trained = self._spans(p + c, [(len(p), len(p + c))], special=True)
            ids, trained = self._eos(ids, trained, True)
        else:
            ids, trained = self._chat(row["messages"])
        if not self.mask_prompt:
            trained = [True] * len(ids)
        return ids, trained

    def _eos(self, ids, trained, value):
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids, trained = ids + [self.eos], trained + [value]
        return ids, trained

    def _spans(self, text: str, spans: list, *, special: bool):
        """Tokenize ``text``; a token is trained when its characters overlap one of ``spans``."""
        if self.fast:
            ids, offsets = self._encode(text, special)
            trained = [any(e > s0 and b < s1 and e > b for s0, s1 in spans) for b, e in offsets]
            return ids, trained
        # slow tokenizers have no offsets: tokenize the pieces between span edges separately
        edges = sorted({0, len(text), *[x for s in spans for x in s]})
        ids, trained = [], []
        if special and getattr(self.tok, "bos_token_id", None) is not None and getattr(
                self.tok, "add_bos_token", False):
            ids, trained = [self.tok.bos_token_id], [False]
        for a, b in zip(edges, edges[1:]):
            if a == b:
                continue
            piece = self._encode_slow(text[a:b], len(ids))
            inside = any(s0 <= a and b <= s1 for s0, s1 in spans)
            ids += list(piece)
            trained += [inside] * len(piece)
            if self.cut:
                break
        return ids, trained

    def _encode(self, text: str, special: bool) -> tuple[list[int], list]:
        """(ids, offsets) of ``text``, or of its first ``max_length`` tokens only.

        A row far longer than max_length tokens is not tokenized whole (a 50 MB row took 77 s and
        7 GB to keep 64 tokens): a prefix of PREFIX_CHARS characters per token is, and its first
        max_length tokens are kept when the last of them ends at least PREFIX_SLACK characters
        before the cut (tokens that far from the cut are those of the whole text: pre-tokenizers
        split at word boundaries). Otherwise the prefix doubles.
        """
        n = self.max_length
        size = n * PREFIX_CHARS + PREFIX_SLACK if n else len(text)
        while True:
            if size >= len(text):
                enc = self.tok(text, add_special_tokens=special, return_offsets_mapping=True)
                return list(enc["input_ids"]), list(enc["offset_mapping"])
            enc = self.tok(text[:size], add_special_tokens=special, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            if len(ids) > n and 0 < offsets[n - 1][1] <= size - PREFIX_SLACK:
                self.cut = True
                return list(ids[:n]), list(offsets[:n])
            size *= 2

    def _encode_slow(self, piece: str, have: int) -> list[int]:
        """Token ids of ``piece`` (no offsets: slow tokenizer), bounded like :meth:`_encode`; the
        last PREFIX_SLACK_TOKENS tokens of a prefix are never kept."""
        n = None if self.max_length is None else self.max_length - have
        size = n * PREFIX_CHARS + PREFIX_SLACK if n is not None else len(piece)
        while True:
            if size >= len(piece):
                return list(self.tok(piece, add_special_tokens=False)["input_ids"])
            ids = self.tok(piece[:size], add_special_tokens=False)["input_ids"]
            if len(ids) >= n + PREFIX_SLACK_TOKENS:
                self.cut = True
                return list(ids[:max(n, 0)])
            size *= 2

    def _render(self, messages, gen: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _chat(self, messages):
        if self.template is None:
            raise AdapteditError("the tokenizer has no chat template, so 'messages' rows cannot be "
                                 "rendered; pass --chat-template FILE (a Jinja template)")
        for j, m in enumerate(messages):  # a typo, unless the template knows the role (GLM's
            if m["role"] not in ROLES and not template_names_role(self.template, m["role"]):
                raise BadRow(f"messages[{j}].role {m['role']!r} is neither a standard role "
                             f"({', '.join(ROLES)}) nor one the chat template names")
        try:
            if self.generation_tags:
                enc = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
                return list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
            full = self._render(messages, False)
            spans = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                pre = self._render(messages[:i], True) if i else ""
                post = self._render(messages[: i + 1], False)
                if not (full.startswith(pre) and full.startswith(post) and len(pre) <= len(post)):
                    raise AdapteditError(
                        "the chat template does not render conversations prefix by prefix (an "
                        "earlier turn changes once later turns are added), so assistant turns "
                        "cannot be located; pass --chat-template FILE with {% generation %} "
                        "blocks, or use prompt/completion rows")
                end = len(post.rstrip())
                if end > len(pre):
                    spans.append((len(pre), end))
        except AdapteditError:
            raise
        except Exception as e:  # jinja errors (e.g. a template that refuses a role order)
            raise BadRow(f"the chat template cannot render these messages "
                         f"({str(e).splitlines()[0][:160]})") from None
        return self._spans(full, spans, special=False)


# ---------------------------------------------------------------------------------------- datasets


@dataclass
class Stats:
    rows: int = 0
    bad_rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_tokens: int = 0
    format: str = ""
    first_bad: str = ""

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["mean_tokens"] = round(self.tokens / self.examples, 2) if self.examples else 0
        return d


@dataclass
class TokenizedData:
    """Token ids of every example in one flat int32 tensor, with per-example offsets."""

    ids: torch.Tensor  # (total,) int32
    trained: torch.Tensor  # (total,) bool
    offsets: torch.Tensor  # (n + 1,) int64
    stats: Stats = field(default_factory=Stats)
    path: str = ""
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.trained[a:b]

    def subset(self, index: list[int]) -> "TokenizedData":
        parts = [self.example(i) for i in index]
        lens = [len(p[0]) for p in parts]
        off = torch.zeros(len(parts) + 1, dtype=torch.int64)
        off[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0) if lens else off[1:]
        ids = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int32)
        tr = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
        st = Stats(examples=len(parts), tokens=int(off[-1]), trained_tokens=int(tr.sum()),
                   max_tokens=max(lens, default=0), format=self.stats.format)
        return TokenizedData(ids, tr, off, st, self.path, self.sha256)


def load(path: Path, tokenizer, *, max_length: int, mask_prompt: bool = True,
         skip_bad_rows: bool = False, limit: int | None = None,
         skip_hint: bool = False, max_rows: int | None = None) -> TokenizedData:
    """Read, check and tokenize a data file (streamed), applying truncation and masking.
    ``limit``: stop after this many examples; ``max_rows``: read only the first rows of the file
    (eval --limit: the rows it generates for). ``skip_hint``: a bad row's error names
    --skip-bad-rows (for the commands that have it)."""
    path = Path(path)
    tok = Tokenize(tokenizer, mask_prompt=mask_prompt, max_length=max_length)
    st = Stats()
    ids_parts, tr_parts, lens = [], [], []
    fmt = None
    for line, row in read_rows(path):
        if max_rows is not None and st.rows >= max_rows:
            break
        st.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            f = row_format(row)
            if fmt is None:
                fmt = f
            elif f != fmt:
                raise BadRow(f"row is in {f} format but the file's first row is in {fmt} format")
            ids, trained = tok(f, row)
        except BadRow as e:
            if not skip_bad_rows:
                hint = " (--skip-bad-rows skips such rows)" if skip_hint else ""
                raise AdapteditError(f"{path}:{line}: {e}{hint}") from None
            st.bad_rows += 1
            st.first_bad = st.first_bad or f"{path}:{line}: {e}"
            continue
        if len(ids) > max_length or tok.cut:
            st.truncated += 1
            ids, trained = ids[:max_length], trained[:max_length]
        # position 0 is never predicted (labels shift by one), so it cannot be a target
        if not any(trained[1:]):
            st.dropped_no_target += 1
            continue
        ids_parts.append(torch.tensor(ids, dtype=torch.int32))
        tr_parts.append(torch.tensor(trained, dtype=torch.bool))
        lens.append(len(ids))
        st.examples += 1
        st.tokens += len(ids)
        st.trained_tokens += sum(trained[1:])
        st.max_tokens = max(st.max_tokens, len(ids))
        if limit is not None and st.examples >= limit:
            break
    st.format = fmt or ""
    if st.rows == 0:
        raise AdapteditError(f"{path}: the file holds no rows")
    if st.examples == 0:
        why = []
        if st.bad_rows:
            why.append(f"{st.bad_rows} bad rows skipped (first: {st.first_bad})")
        if st.dropped_no_target:
            why.append(f"{st.dropped_no_target} examples had no trained token after masking and "
                       "truncation (raise --max-length, or check that rows have a completion / "
                       "assistant turn)")
        raise AdapteditError(f"{path}: no trainable example left: {'; '.join(why)}")
    off = torch.zeros(len(lens) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    return TokenizedData(torch.cat(ids_parts), torch.cat(tr_parts), off, st, str(path),
                         sha256_file(path))


def split(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """(train, eval): a seeded random ``fraction`` of the examples (at least one) held out."""
    n = len(data)
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        raise AdapteditError(f"--eval-split {fraction}: would leave no training example out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = sorted(perm[:k])
    keep = sorted(perm[k:])
    train, ev = data.subset(keep), data.subset(held)
    train.stats = Stats(**{**data.stats.__dict__, "examples": len(keep), "tokens": train.stats.tokens,
                           "trained_tokens": train.stats.trained_tokens})
    return train, ev


# ---------------------------------------------------------------------------------------- batching


def order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class Stream:
    """Examples in epoch order, addressed by their global position (examples consumed so far).

    Position p is example ``order(epoch)[p mod n]`` with epoch = p // n, so a run that restarts at
    position p sees exactly what an uninterrupted run sees: the data position is a single integer.
    """

    def __init__(self, data: TokenizedData, seed: int):
        self.data, self.seed = data, seed
        self._epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        n = len(self.data)
        epoch = position // n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, order(n, self.seed, epoch)
        return int(self._perm[position % n])

    def batch(self, start: int, size: int, pad_id: int) -> dict:
        return collate([self.data.example(self.index(p)) for p in range(start, start + size)],
                       pad_id)


def collate(examples: list, pad_id: int) -> dict:
    """Right-pad to the longest example: input_ids, attention_mask, labels (−100 where masked)."""
    t = max(len(e[0]) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, (x, tr) in enumerate(examples):
        n = len(x)
        ids[i, :n] = x.long()
        mask[i, :n] = 1
        labels[i, :n] = torch.where(tr, x.long(), torch.full_like(x.long(), IGNORE))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(data: TokenizedData, size: int, pad_id: int):
    """All examples in file order, ``size`` at a time (evaluation)."""
    for a in range(0, len(data), size):
        yield collate([data.example(i) for i in range(a, min(a + size, len(data)))], pad_id)
