"""Training data: every file format, every row format, masking (−100 exactly on prompt tokens,
checked by decoding), chat masking with the tiny ChatML template and the real SmolLM2 template,
truncation/dropping statistics and every malformed-row case (file and line in the message)."""

import copy
import csv
import json

import pytest
import torch

from adaptedit import data
from adaptedit.errors import AdapteditError
from adaptedit.models import resolve

CHAT = [
    {"messages": [{"role": "user", "content": "What is 2+3?"},
                  {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello there"},
                  {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "bye"}]},
]
PC = [{"prompt": "Write 1987-03-05 in words: ", "completion": "March 5, 1987"},
      {"prompt": "Q: 4+4?\nA:", "completion": " 8"}]
TEXT = [{"text": "The capital of France is Paris."}, {"text": "One two three."}]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return resolve(str(tiny_llama)).tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    return resolve(None).tokenizer()  # the embedded model is part of the test setup (setup.sh)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def examples(d):
    return [tuple(t.tolist() for t in d.example(i)) for i in range(len(d))]


def parts(tok, ids, trained):
    """(trained text, masked text), decoded without skipping special tokens."""
    return (tok.decode([i for i, t in zip(ids, trained) if t]),
            tok.decode([i for i, t in zip(ids, trained) if not t]))


# ------------------------------------------------------------------------------------- masking


def test_text_rows_train_every_token(tok, tmp_path):
    d = data.load(write_jsonl(tmp_path / "t.jsonl", TEXT), tok, max_length=256)
    assert d.stats.format == "text" and len(d) == 2
    for (ids, trained), row in zip(examples(d), TEXT):
        assert all(trained)
        assert tok.decode(ids, skip_special_tokens=True).strip() == row["text"]
        assert ids[-1] == tok.eos_token_id


def test_prompt_completion_masks_exactly_the_prompt(tok, tmp_path):
    d = data.load(write_jsonl(tmp_path / "pc.jsonl", PC), tok, max_length=256)
    assert d.stats.format == "prompt-completion"
    for (ids, trained), row in zip(examples(d), PC):
        got, masked = parts(tok, ids, trained)
        # a token that straddles the boundary (the prompt's trailing space merged into the first
        # completion word) is trained: it is how the completion starts
        tail = row["prompt"][len(row["prompt"].rstrip()):]
        end = row["completion"] + tok.eos_token
        assert got.endswith(end) and got[: len(got) - len(end)] in ("", tail), got
        assert masked.removeprefix(tok.bos_token or "") + got[: len(got) - len(end)] == row["prompt"]
        # trained tokens form one contiguous block at the end
        first = trained.index(True)
        assert all(trained[first:]) and not any(trained[:first])
    batch = data.collate([d.example(0)], pad_id=0)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    n_prompt = examples(d)[0][1].index(True)
    assert (labels[:n_prompt] == data.IGNORE).all() and torch.equal(labels[n_prompt:], ids[n_prompt:])


def test_no_mask_prompt_trains_everything(tok, tmp_path):
    d = data.load(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, max_length=256, mask_prompt=False)
    assert all(all(t) for _, t in examples(d))


def _check_chat(tok, d, eot):
    for (ids, trained), row in zip(examples(d), CHAT):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        got, masked = parts(tok, ids, trained)
        assert got == "".join(a + eot for a in answers)
        full = tok.apply_chat_template(row["messages"], tokenize=False)
        assert tok.decode(ids) == full
        for a in answers:  # assistant text never leaks into the masked part
            assert a + eot not in masked


def test_chat_masking_tiny_chatml(tok, tmp_path):
    assert tok.chat_template, "the tiny_llama fixture should carry a ChatML template"
    d = data.load(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, max_length=256)
    assert d.stats.format == "messages"
    _check_chat(tok, d, "<|im_end|>")


@pytest.mark.slow
def test_chat_masking_real_smollm2_template(smol_tok, tmp_path):
    d = data.load(write_jsonl(tmp_path / "c.jsonl", CHAT), smol_tok, max_length=256)
    _check_chat(smol_tok, d, "<|im_end|>")
    ids, trained = examples(d)[0]
    # the default system prompt, the user turn and the assistant header are all masked
    assert smol_tok.decode([i for i, t in zip(ids, trained) if not t]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_unknown_role_is_an_error_unless_the_template_knows_it(tok, tmp_path):
    rows = [CHAT[0], {"messages": [{"role": "wizard", "content": "hi"},
                                   {"role": "assistant", "content": "x"}]}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(AdapteditError, match=r"r.jsonl:2: messages\[0\].role 'wizard' is neither"):
        data.load(path, tok, max_length=256)
    tpl = tmp_path / "t.jinja"  # a template with its own role (as GLM-4's "observation")
    tpl.write_text("{% for m in messages %}{% if m['role'] == 'wizard' %}[magic]{% endif %}"
                   "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok2 = copy.deepcopy(tok)
    data.set_chat_template(tok2, tpl)
    assert len(data.load(path, tok2, max_length=256)) == 2


def test_generation_tag_template_gives_the_same_mask(tok, tmp_path):
    tpl = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
           "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}{% else %}"
           "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path / "gen.jinja"
    path.write_text(tpl)
    rows = write_jsonl(tmp_path / "c.jsonl", CHAT)
    old = tok.chat_template
    try:
        data.set_chat_template(tok, path)
        assert data.Tokenize(tok).generation_tags
        render = tok.apply_chat_template(CHAT[1]["messages"], tokenize=False)
        a = examples(data.load(rows, tok, max_length=256))
        tok.chat_template = tpl.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        assert tok.apply_chat_template(CHAT[1]["messages"], tokenize=False) == render
        assert not data.Tokenize(tok).generation_tags
        b = examples(data.load(rows, tok, max_length=256))
    finally:
        tok.chat_template = old
    assert a == b
    _check_chat(tok, data.load(rows, tok, max_length=256), "<|im_end|>")


def test_missing_chat_template_says_so(tok, tmp_path):
    old = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(AdapteditError, match="no chat template.*--chat-template"):
            data.load(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, max_length=256)
        tpl = tmp_path / "t.jinja"
        tpl.write_text(old)
        data.set_chat_template(tok, tpl)
        assert len(data.load(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, max_length=256)) == 2
    finally:
        tok.chat_template = old


# ------------------------------------------------------------------------------------- formats


def test_every_file_format_gives_the_same_tokens(tok, tmp_path):
    rows = PC
    ref = examples(data.load(write_jsonl(tmp_path / "a.jsonl", rows), tok, max_length=256))
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("b.json", "c.csv", "d.parquet"):
        assert examples(data.load(tmp_path / name, tok, max_length=256)) == ref, name
    # chat rows in JSON list, Parquet (list of structs) and CSV (a JSON column)
    cref = examples(data.load(write_jsonl(tmp_path / "m.jsonl", CHAT), tok, max_length=256))
    (tmp_path / "m.json").write_text(json.dumps(CHAT))
    pq.write_table(pa.Table.from_pylist(CHAT), tmp_path / "m.parquet")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerows([[json.dumps(r["messages"])] for r in CHAT])
    for name in ("m.json", "m.parquet", "m.csv"):
        assert examples(data.load(tmp_path / name, tok, max_length=256)) == cref, name


def test_extra_fields_are_ignored_and_json_lines_in_dot_json(tok, tmp_path):
    rows = [dict(r, id=i) for i, r in enumerate(TEXT)]
    d = data.load(write_jsonl(tmp_path / "x.json", rows), tok, max_length=256)  # JSONL named .json
    assert len(d) == 2


def test_truncation_and_dropping_are_counted(tok, tmp_path):
    rows = [{"prompt": "word " * 40, "completion": "answer"}, PC[1], {"text": "x"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows[:2])
    d = data.load(path, tok, max_length=20)
    assert d.stats.truncated == 1 and d.stats.dropped_no_target == 1 and len(d) == 1
    assert d.stats.max_tokens <= 20
    with pytest.raises(AdapteditError, match="no trainable example left.*1 examples had no trained"):
        data.load(write_jsonl(tmp_path / "u.jsonl", rows[:1]), tok, max_length=20)


def test_stream_is_a_pure_function_of_position(tok, tmp_path):
    rows = [{"text": f"row {i}"} for i in range(7)]
    d = data.load(write_jsonl(tmp_path / "s.jsonl", rows), tok, max_length=32)
    a = [data.Stream(d, 3).index(p) for p in range(30)]
    s = data.Stream(d, 3)
    b = [s.index(p) for p in [*range(15, 30), *range(15)]]
    assert a == b[15:] + b[:15]
    assert sorted(a[:7]) == list(range(7)) and sorted(a[7:14]) == list(range(7)) and a[:7] != a[7:14]


def test_eval_split_is_seeded_and_disjoint(tok, tmp_path):
    rows = [{"text": f"row number {i}"} for i in range(40)]
    d = data.load(write_jsonl(tmp_path / "s.jsonl", rows), tok, max_length=32)
    tr, ev = data.split(d, 0.1, seed=1)
    assert len(ev) == 4 and len(tr) == 36
    seen = {tuple(x) for x, _ in examples(tr)} | {tuple(x) for x, _ in examples(ev)}
    assert len(seen) == 40
    assert examples(data.split(d, 0.1, seed=1)[1]) == examples(ev)


# ------------------------------------------------------------------------------------ bad rows

BAD = [
    ('{"text": "ok"', "invalid JSON"),
    ('[1, 2]', "expected an object, got list"),
    ('{"foo": 1}', "no 'text', 'prompt'/'completion' or 'messages' field"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "ambiguous row"),
    ('{"text": 5}', "'text' must be a string, got int"),
    ('{"text": "   "}', "'text' is empty"),
    ('{"prompt": "a"}', "has 'prompt' but no 'completion' field"),
    ('{"completion": "a"}', "has 'completion' but no 'prompt' field"),
    ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
    ('{"prompt": null, "completion": "b"}', "'prompt' must be a string, got NoneType"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "messages[0] must be an object with 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "", "content": "x"}]}', "messages[0].role must be a non-empty string"),
    ('{"prompt": "a", "completion": "b"}', "row is in prompt-completion format but the file's first"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_row_names_file_line_and_problem(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [TEXT[0], "", line, TEXT[1]])
    with pytest.raises(AdapteditError) as e:
        data.load(path, tok, max_length=64)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and message in msg and "\n" not in msg
    d = data.load(path, tok, max_length=64, skip_bad_rows=True)
    assert len(d) == 2 and d.stats.bad_rows == 1 and d.stats.first_bad.startswith(f"{path}:3:")


def test_bad_rows_in_json_list_and_csv(tok, tmp_path):
    p = tmp_path / "b.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": 3}\n]')
    with pytest.raises(AdapteditError, match=rf"^{p}:3: 'text' must be a string"):
        data.load(p, tok, max_length=64)
    p.write_text('[\n  {"text": "a"},\n  {"text": \n]')
    with pytest.raises(AdapteditError, match=rf"^{p}:4: invalid JSON"):
        data.load(p, tok, max_length=64)
    c = tmp_path / "b.csv"
    c.write_text('prompt,completion\na,b\n"multi\nline",c,extra\nd,e\n')
    with pytest.raises(AdapteditError, match=rf"^{c}:3: 3 fields, the header has 2"):
        data.load(c, tok, max_length=64)
    assert data.load(c, tok, max_length=64, skip_bad_rows=True).stats.bad_rows == 1


def test_nothing_usable_is_an_error_never_a_zero_loss(tok, tmp_path):
    with pytest.raises(AdapteditError, match="holds no rows"):
        data.load(write_jsonl(tmp_path / "e.jsonl", [""]), tok, max_length=64)
    with pytest.raises(AdapteditError, match="no trainable example left: 2 bad rows"):
        data.load(write_jsonl(tmp_path / "f.jsonl", ['{"x": 1}', "[]"]), tok, max_length=64,
               skip_bad_rows=True)
    only_users = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(AdapteditError, match="had no trained token"):
        data.load(write_jsonl(tmp_path / "g.jsonl", only_users), tok, max_length=64)
    with pytest.raises(AdapteditError, match="unknown data file type"):
        data.load(tmp_path / "g.txt" if (tmp_path / "g.txt").write_text("x") else None, tok,
               max_length=64)


def test_a_folder_given_as_data_is_named_as_such(tok, tmp_path):
    with pytest.raises(AdapteditError, match=rf"^{tmp_path}: a folder, not a data file; give the "):
        data.load(tmp_path, tok, max_length=64)
    with pytest.raises(AdapteditError, match=rf"^{tmp_path / 'none.jsonl'}: no such data file$"):
        data.load(tmp_path / "none.jsonl", tok, max_length=64)
