"""Evaluate a model or an adapter on held-out data (``adaptedit eval``): loss and exact match.

Loss. The file is read, checked, tokenized and masked by :mod:`adaptedit.data` exactly as ``train``
reads its ``--eval-data``, and the loss is computed by ``train``'s own code
(:class:`adaptedit.loss.TrainedPositions` + :func:`adaptedit.loss.loss_sum`):

    loss = Σ_rows Σ_{t trained} −log p(x_t | x_<t)  /  #trained tokens

the mean cross-entropy per trained token, token-weighted over the whole file — the number ``train``
reports as ``eval_loss`` for the same file and adapter.

Exact match (rows with a reference answer). The reference is the row's ``answer`` field if present,
else the last assistant message (chat rows) or the ``completion``. The prompt is rendered exactly as
in training (chat rows: the messages before the last assistant turn through the chat template with
the generation prompt; prompt/completion rows: the prompt string with the tokenizer's special
tokens), left-padded in batches, and decoded greedily up to the model's EOS or the token train
puts after an answer (the tokenizer's EOS; for chat rows the template's end-of-turn). Scoring
follows lm-evaluation-harness's two GSM8K filters:

    answer  = text after the last "####" of the reference, else the whole reference (stripped)
    strict  = first line of the generation's text after its last "####" == answer
    flexible = last number of the generation == answer          (when the answer is a number;
               numbers normalised: "," "$" dropped, "-" kept, "7." "7.0" "7.50" → "7" "7" "7.5")
             = stripped first line of the generation == answer (otherwise)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptedit.data import TokenizedData, batches
from adaptedit.data import load as load_data
from adaptedit.rows import BadRow, read_rows, row_format
from adaptedit.errors import AdapteditError, UsageError


@dataclass
class EvalOptions:
    max_new_tokens: int = 64
    batch_size: int = 8
    limit: int | None = None  # the first N rows of the file
    generate: bool = True  # exact match by greedy generation (--no-generate: loss only)
    max_length: int | None = None  # None: train's default (TrainConfig.max_length)
    device: str = "auto"
    dtype: str = "auto"
    chat_template: str | None = None  # Jinja file for 'messages' rows (train's --chat-template)
    mask_prompt: bool = True  # the loss over completions / assistant turns only (train's default)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be ≥ 1")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be ≥ 1")
        if self.limit is not None and self.limit < 1:
            raise UsageError("--limit must be ≥ 1")
        if self.max_length is not None and self.max_length < 2:
            raise UsageError("--max-length must be ≥ 2")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise UsageError(f"--dtype {self.dtype!r}: use auto, bf16, fp16 or fp32")


# -------------------------------------------------------------------------------------- scoring

# a number: optional sign, optional $, digits with thousands separators or plain, optional decimals
_NUMBER = re.compile(r"([-−]?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def extract_answer(reference: str) -> str:
    """The reference answer: the text after the last ``####`` (GSM8K), else the whole, stripped."""
    return reference.rsplit("####", 1)[1].strip() if "####" in reference else reference.strip()


def _normal(sign: str, digits: str) -> str:
    digits = digits.replace(",", "")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    digits = digits.lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if sign and digits != "0" else "") + digits


def _numbers(text: str) -> list[str]:
    """Every number of ``text``, normalised; a minus sign counts only where it is not a hyphen
    between words or digits ("10-3" is 10 and 3, "x = -3" is −3)."""
    out = []
    for m in _NUMBER.finditer(text):
        sign = m.group(1)
        if sign and m.start() > 0 and text[m.start() - 1].isalnum():
            sign = ""
        out.append(_normal(sign, m.group(2)))
    return out


def as_number(answer: str) -> str | None:
    """The normalised number when ``answer`` is one number (``-$1,234.50.`` → ``-1234.5``)."""
    text = answer.strip().rstrip(".").strip()
    m = _NUMBER.fullmatch(text) or re.fullmatch(r"\$([-−]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)",
                                                 text)
    return _normal(m.group(1), m.group(2)) if m else None


# lm-evaluation-harness's gsm8k "strict-match": the first "#### <number>" of the generation, then
# commas, "$" and one trailing "." ignored on both sides (its regexes_to_ignore)
_STRICT = re.compile(r"#### (-?[0-9.,]+)")


def _lm_eval_normal(text: str) -> str:
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "")).strip()


def score(generation: str, answer: str) -> tuple[bool, bool]:
    """(flexible, strict) exact match of one generation against a reference answer."""
    number = as_number(answer)
    strict = False
    if number is not None:
        m = _STRICT.search(generation)
        strict = m is not None and _lm_eval_normal(m.group(1)) == _lm_eval_normal(answer)
    elif "####" in generation:
        after = generation.rsplit("####", 1)[1].strip()
        strict = (after.splitlines()[0].strip() if after else "") == answer
    if number is not None:
        found = _numbers(generation)
        flexible = bool(found) and found[-1] == number
    else:
        lines = generation.strip().splitlines()
        flexible = (lines[0].strip() if lines else "") == answer
    return flexible, strict


# ------------------------------------------------------------------------------------- the rows


@dataclass
class Item:
    """One row to generate for: the rendered prompt and the reference (None: nothing to score)."""

    prompt: str
    reference: str | None
    special: bool  # add the tokenizer's special tokens (prompt/completion rows, as train does)


def items(path: Path, tokenizer, limit: int | None) -> list[Item]:
    """The generation prompts and references of the first ``limit`` rows, in file order."""
    out = []
    for line, row in read_rows(Path(path)):
        if limit is not None and len(out) >= limit:
            break
        try:
            if isinstance(row, BadRow):
                raise row
            fmt = row_format(row)
        except BadRow as e:
            raise AdapteditError(f"{path}:{line}: {e}") from None
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise AdapteditError(f"{path}:{line}: 'answer' must be a string or a number")
        if fmt == "text":
            out.append(_scorable(Item(row["text"], None if answer is None else str(answer), True),
                                 path, line))
            continue
        if fmt == "prompt-completion":
            ref = row["completion"] if answer is None else str(answer)
            out.append(_scorable(Item(row["prompt"], ref, True), path, line))
            continue
        msgs = row["messages"]
        ref = str(answer) if answer is not None else None
        if msgs[-1]["role"] == "assistant":
            ref = msgs[-1]["content"] if ref is None else ref
            msgs = msgs[:-1]
        if not msgs:
            raise AdapteditError(f"{path}:{line}: the only message is the assistant's; no prompt "
                                 "to generate from")
        try:
            prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise AdapteditError(f"{path}:{line}: the chat template cannot render these messages "
                                 f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
                                 ) from None
        out.append(_scorable(Item(prompt, ref, False), path, line))
    return out


def _scorable(item: Item, path: Path, line: int) -> Item:
    """Refuse an empty reference answer: an empty generation (an immediate EOS) would match it."""
    if item.reference is not None and not extract_answer(item.reference):
        raise AdapteditError(f"{path}:{line}: the reference answer is empty ('answer', the "
                             "completion or the last assistant message, or its text after ####); "
                             "an empty generation would count as correct: give the answer")
    return item


_TURN = "\u2063adaptedit-answer\u2063"  # an assistant turn's content, to find what follows it


def stop_ids(model, tokenizer, chat: bool) -> list[int]:
    """The tokens that end a generation: the model's EOS, and the token train puts after an answer:
    the tokenizer's EOS (prompt/completion rows) or, for chat rows, the special token that closes
    an assistant turn in the chat template (<|im_end|>, <|eot_id|>...), which a base model's EOS
    need not be."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if chat:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": _TURN}],
                                                 tokenize=False)
        except Exception:  # a template that wants other turns: the EOS ids only
            text = ""
        after = tokenizer(text.split(_TURN, 1)[1], add_special_tokens=False)["input_ids"] \
            if _TURN in text else []
        if after and tokenizer.decode(after[:1], skip_special_tokens=True) == "":
            ids.add(after[0])  # a special token, not text such as "\n"
    return sorted(ids)


def generate(model, tokenizer, batch: list[Item], max_new_tokens: int, device) -> list[str]:
    """Greedy continuations of ``batch`` (left padding, so every prompt ends at the same column),
    each ending at the first of :func:`stop_ids`."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer([b.prompt for b in batch], return_tensors="pt", padding=True,
                        add_special_tokens=batch[0].special)
    finally:
        tokenizer.padding_side = side
    pad_id = tokenizer.pad_token_id
    tokenizer.pad_token = pad
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                             eos_token_id=stop_ids(model, tokenizer, not batch[0].special))
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


# -------------------------------------------------------------------------------------- the loss


def loss_totals(model, data: TokenizedData, batch_size: int, device, dtype) -> tuple[float, int]:
    """(Σ cross-entropy, #trained tokens) over ``data`` in file order, by train's loss code."""
    from adaptedit.devices import autocast
    from adaptedit.loss import TrainedPositions, loss_sum, trained_tokens

    positions = TrainedPositions(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    try:
        with torch.no_grad(), autocast(device, dtype):
            for batch in batches(data, batch_size, 0):
                total += loss_sum(model, positions, batch, device).double()
                n += trained_tokens(batch)
    finally:
        positions.handle.remove()
        model.train(was_training)
    return float(total), n


def _max_length(opts: EvalOptions) -> int:
    from adaptedit.train_config import TrainConfig

    return opts.max_length if opts.max_length is not None else TrainConfig.max_length


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def evaluate_model(model, tokenizer, data: Path, opts: EvalOptions, *, progress=None,
                   retain_data: Path | None = None) -> dict:
    """Evaluate an already loaded model (with or without an attached adapter) on ``data``.

    ``progress``, if given, is called as ``progress(stage, done, total)`` with stage "loss",
    "retain" or "generate". Returns the result dict (see the module docstring).
    """
    opts.validate()
    data = Path(data)
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    # --limit: the first rows, the same ones generation scores (not the first trainable examples)
    tokenized = load_data(data, tokenizer, max_length=_max_length(opts), max_rows=opts.limit,
                          mask_prompt=opts.mask_prompt)
    tell = progress or (lambda *a: None)
    tell("loss", 0, len(tokenized))
    s, n = loss_totals(model, tokenized, opts.batch_size, device, dtype)
    tell("loss", len(tokenized), len(tokenized))
    st = tokenized.stats
    result = {"loss": s / n, "tokens": n, "rows": st.rows, "examples": st.examples,
              "truncated": st.truncated, "dropped_no_target": st.dropped_no_target,
              "data": str(data), "model": getattr(model.config, "_name_or_path", None),
              "adapter": None, "exact_match": None, "exact_match_strict": None, "n_scored": 0,
              "generations": []}
    if retain_data is not None:
        retained = load_data(Path(retain_data), tokenizer, max_length=_max_length(opts))
        tell("retain", 0, len(retained))
        rs, rn = loss_totals(model, retained, opts.batch_size, device, dtype)
        tell("retain", len(retained), len(retained))
        result.update(retain_loss=rs / rn, retain_tokens=rn, retain_data=str(retain_data))
    if not opts.generate:
        return result
    todo = items(data, tokenizer, opts.limit)
    scored = [it for it in todo if it.reference is not None]
    flex = strict = 0
    gens = []
    tell("generate", 0, len(scored))
    for a in range(0, len(scored), opts.batch_size):
        batch = scored[a:a + opts.batch_size]
        texts = generate(model, tokenizer, batch, opts.max_new_tokens, device)
        for it, text in zip(batch, texts):
            answer = extract_answer(it.reference)
            f, s_ = score(text, answer)
            flex += f
            strict += s_
            gens.append({"prompt": it.prompt, "reference": it.reference, "generation": text,
                         "answer": answer, "correct": f, "correct_strict": s_})
        tell("generate", min(a + opts.batch_size, len(scored)), len(scored))
    if scored:
        result.update(exact_match=flex / len(scored), exact_match_strict=strict / len(scored),
                      n_scored=len(scored))
    result["generations"] = gens
    return result


def _is_adapter(path: Path) -> bool:
    from adaptedit.formats import folder_format

    return folder_format(path) is not None


def load(ref: str, *, base: str | None = None, device: str = "auto", dtype: str = "auto",
         trust_remote_code: bool = False):
    """(model, tokenizer, model ref, adapter path or None) for a model ref or an adapter folder."""
    from adaptedit.binding import base_for, check_weight, recorded_targets
    from adaptedit.formats import load_adapter
    from adaptedit.layer import attach
    from adaptedit.models import resolve
    from adaptedit.devices import Dist, pick_device, pick_dtype

    dev = pick_device(device, Dist())
    dt = pick_dtype(dtype, dev)
    path = Path(ref).expanduser()
    if _is_adapter(path):
        adapter = load_adapter(path)
        source = base_for(adapter, base, trust_remote_code=trust_remote_code)
        # the binding of merge and inspect (a PEFT LoRA may also adapt an untied output head)
        for name, t in recorded_targets(adapter, source).items():
            check_weight(adapter, name, source.checkpoint.get(t.key), source.ref)
        model = attach(source.load(dtype=dt, device=dev), adapter)
        return model.eval(), source.tokenizer(), source.ref, str(path)
    if base is not None:
        raise UsageError(f"--base applies to an adapter folder; {ref} is a model")
    source = resolve(ref, trust_remote_code=trust_remote_code, quiet=True)
    return source.load(dtype=dt, device=dev), source.tokenizer(), source.ref, None


def evaluate(ref: str, data: Path, opts: EvalOptions | None = None, *, base: str | None = None,
             retain_data: Path | None = None, trust_remote_code: bool = False,
             progress=None) -> dict:
    """Load ``ref`` (a model or an adapter folder, attached without merging) and evaluate it."""
    opts = opts or EvalOptions()
    opts.validate()
    for name, p in (("--data", data), ("--retain-data", retain_data)):
        if p is not None and Path(p).is_dir():
            raise AdapteditError(f"{name} {p}: a folder; give a data file (.jsonl, .json, .csv "
                                 "or .parquet)")
        if p is not None and not Path(p).is_file():
            raise AdapteditError(f"{name} {p}: no such file")
    model, tokenizer, model_ref, adapter = load(ref, base=base, device=opts.device,
                                                dtype=opts.dtype,
                                                trust_remote_code=trust_remote_code)
    if opts.chat_template:
        from adaptedit.data import set_chat_template

        set_chat_template(tokenizer, Path(opts.chat_template))
    result = evaluate_model(model, tokenizer, data, opts, progress=progress,
                            retain_data=retain_data)
    result.update(model=model_ref, adapter=adapter,
                  device=str(_device_of(model)),
                  dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    return result
