"""eval: exact-match scoring on tricky strings; the loss equals train's eval loss for the same
adapter and file (1e-6 relative) and the merged folder's (1e-4); batched left-padded generation
equals one-row greedy decoding; the command line (--json, --retain-data, refusals, one-line errors)."""

import json
import random

import pytest
import torch

from adaptedit import train as training
from adaptedit.train_config import make_config
from adaptedit.adapter import save_adapter
from adaptedit.evaluate import EvalOptions, as_number, evaluate, extract_answer, score
from adaptedit.init import InitOptions, build
from adaptedit.models import resolve

from helpers import run_cli


@pytest.mark.parametrize("reference,answer", [
    ("She has 3 + 4 = 7 eggs.\n#### 7", "7"),
    ("a #### b #### -12 ", "-12"),
    ("  Paris \n", "Paris"),
    ("#### 1,234", "1,234"),
])
def test_extract_answer(reference, answer):
    assert extract_answer(reference) == answer


@pytest.mark.parametrize("generation,answer,flexible,strict", [
    ("3 + 4 = 7 eggs.\n#### 7", "7", True, True),             # GSM8K style
    ("#### 7\nQuestion: next one has 9", "7", False, True),   # strict reads the #### line only
    ("The answer is -3.", "-3", True, False),                 # negative, trailing period
    ("10-3=7", "7", True, False),                              # hyphen is not a sign
    ("10 - 3 = -7", "-7", True, False),
    ("It costs $1,234.00 in total.", "1234", True, False),    # $, thousands, .00
    ("It costs 1234", "$1,234", True, False),                 # the answer normalised too
    ("pi is about 3.14", "3.140", True, False),               # decimals
    ("2.5 or 3.5?", "2.5", False, False),                     # the LAST number counts
    ("The distance is 42 km", "42", True, False),             # units after the number
    ("The distance is 42 km", "42 km", False, False),         # non-number answer: first line
    ("42 km\nmore text", "42 km", True, False),
    ("I do not know", "5", False, False),                     # no number at all
    ("", "5", False, False),
    ("#### 1,234", "1,234", True, True),
    ("Paris.", "Paris", False, False),                        # text answers are exact
    # strict numbers as lm-evaluation-harness's gsm8k strict-match: regex "#### (-?[0-9.,]+)",
    # first match, then ",", "$" and a trailing "." ignored on both sides
    ("#### 1,234", "1234", True, True),
    ("#### 5.", "5", True, True),
    ("#### 5 apples", "5", True, True),
    ("#### 3\n#### 5", "5", True, False),                     # the first #### counts
    ("#### 72.00", "72", True, False),                        # no decimal normalisation there
    ("####7", "7", True, False),                              # "#### " with its space
    ("The answer is #### May 27, 2044", "May 27, 2044", False, True),  # text: the line after ####
])
def test_score(generation, answer, flexible, strict):
    assert score(generation, answer) == (flexible, strict)


def test_as_number():
    assert as_number("-$1,234.50.") == "-1234.5"
    assert as_number("$-7") == "-7" and as_number("007") == "7" and as_number("-0.0") == "0"
    assert as_number("12 apples") is None and as_number("1,23") is None


def rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("eval")
    for name, n, seed in (("train.jsonl", 16, 0), ("valid.jsonl", 6, 1)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
    save_adapter(build(resolve(str(tiny_llama)), InitOptions(method="pissa", rank=4)), d / "ad")
    cfg, given = make_config({"data": str(d / "train.jsonl"), "eval_data": str(d / "valid.jsonl"),
                                "steps": 3, "batch_size": 4, "lr": 1e-2, "save_every": 0})
    summary = training.train(training.prepare(d / "ad", cfg, given=given))
    return d, summary


def test_loss_equals_train_eval_loss_and_merged(trained):
    d, summary = trained
    r = evaluate(str(d / "ad"), d / "valid.jsonl", EvalOptions(batch_size=4, generate=False))
    assert r["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert r["rows"] == 6 and r["adapter"] == str(d / "ad") and r["exact_match"] is None
    code, _, err = run_cli(["merge", str(d / "ad"), "-o", str(d / "merged"), "--quiet"])
    assert code == 0, err
    m = evaluate(str(d / "merged"), d / "valid.jsonl", EvalOptions(batch_size=3, generate=False))
    assert m["adapter"] is None and m["tokens"] == r["tokens"]
    assert abs(m["loss"] - r["loss"]) < 1e-4
    # the trained adapter changed the model: the base's loss on the same file differs
    b = evaluate(resolve_ref(d), d / "valid.jsonl", EvalOptions(generate=False))
    assert b["tokens"] == r["tokens"] and abs(b["loss"] - r["loss"]) > 1e-3


def test_limit_takes_the_same_rows_for_loss_and_exact_match(trained, tmp_path):
    """--limit N: the loss is over the first N rows, the rows generation scores; a first row left
    without a trained token by --max-length used to pull row N + 1 into the loss."""
    d, _ = trained
    rs = rows(3, 7)
    rs[0]["messages"][0]["content"] = "plus " * 200  # no trained token left at --max-length 64
    f = tmp_path / "f.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rs))
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps(rs[1]) + "\n")
    opts = dict(max_length=64, max_new_tokens=2, batch_size=2)
    r = evaluate(str(d / "ad"), f, EvalOptions(limit=2, **opts))
    assert (r["rows"], r["examples"], r["dropped_no_target"], r["n_scored"]) == (2, 1, 1, 2)
    only = evaluate(str(d / "ad"), second, EvalOptions(generate=False, **opts))
    assert r["loss"] == pytest.approx(only["loss"], rel=1e-6) and r["tokens"] == only["tokens"]


def test_generation_batched_equals_single_greedy(trained, tiny_llama):
    d, _ = trained
    r = evaluate(str(tiny_llama), d / "valid.jsonl", EvalOptions(max_new_tokens=5, batch_size=4,
                                                                  limit=5))
    assert r["n_scored"] == 5 and len(r["generations"]) == 5
    src = resolve(str(tiny_llama))
    model, tok = src.load(dtype=torch.float32), src.tokenizer()
    flex = 0
    for g, row in zip(r["generations"], rows(5, 1)):
        prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False,
                                         add_generation_prompt=True)
        assert g["prompt"] == prompt and g["reference"] == row["messages"][1]["content"]
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        assert g["generation"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert g["answer"] == g["reference"].strip()
        flex += score(g["generation"], g["answer"])[0]
    assert r["exact_match"] == flex / 5


def test_cli_json_answers_retain_and_errors(trained, tmp_path):
    d, _ = trained
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " 2+2=4\n#### 4"}) + "\n"
                  + json.dumps({"prompt": "Q: x?", "completion": " y", "answer": "-1,000"}) + "\n")
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(pc), "--max-new-tokens", "3",
                              "--retain-data", str(d / "train.jsonl"), "--json", "--quiet"])
    assert code == 0, err
    r = json.loads(out)
    for k in ("loss", "tokens", "rows", "exact_match", "exact_match_strict", "n_scored", "model",
              "adapter", "data", "generations", "retain_loss"):
        assert k in r
    assert [g["answer"] for g in r["generations"]] == ["4", "-1,000"]
    assert [g["prompt"] for g in r["generations"]] == ["Q: 2+2?", "Q: x?"]
    assert r["rows"] == 2 and r["retain_loss"] > 0
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(pc), "--max-new-tokens", "3",
                              "--quiet"])  # a #### reference: the strict score is shown
    assert code == 0 and "exact match (strict ####)" in out
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(d / "train.jsonl"), "--limit",
                              "2", "--max-new-tokens", "2", "--quiet"])  # none: not shown
    assert code == 0 and "exact match" in out and "strict" not in out
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(pc), "--no-generate", "--quiet"])
    assert code == 0 and "loss" in out and "exact match" not in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(bad)])
    assert code == 1 and f"{bad}:2" in err and len(err.strip().splitlines()) == 1
    assert "--skip-bad-rows" not in err  # a flag of train's: eval has none to offer
    code, _, err = run_cli(["eval", str(d / "ad"), "--data", str(tmp_path / "none.jsonl")])
    assert code == 1 and "none.jsonl" in err and "no such file" in err
    code, _, err = run_cli(["eval", str(d / "ad"), "--data", str(tmp_path)])
    assert code == 1 and err == f"error: --data {tmp_path}: a folder; give a data file (.jsonl, " \
        ".json, .csv or .parquet)\n", err
    code, _, err = run_cli(["eval", str(d / "ad"), "--data", str(pc), "--limit", "0"])
    assert code == 2 and "--limit" in err
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(pc), "--no-generate",
                              "--max-new-tokens", "3"])  # refused, not silently ignored
    assert code == 2 and err.startswith("error: --max-new-tokens") and not out
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(pc), "--json", "--show", "1"])
    assert code == 2 and err.startswith("error: --show") and not out  # JSON has them all
    code, _, err = run_cli(["eval", resolve_ref(d), "--base", "x/y", "--data", str(pc)])
    assert code == 2 and "--base" in err


def resolve_ref(d):
    return json.loads((d / "ad" / "adaptedit.json").read_text())["base"]["path"]


# The examples table of docs/eval.md, row for row (reference, generation, flexible, strict).
@pytest.mark.parametrize("reference,generation,flexible,strict", [
    ("#### 1,234", "so the total is $1234.00", True, False),
    ("#### -5", "The answer is #### -5", True, True),
    ("42", "I think 41 or 42", True, False),
    ("42", "42 or maybe 41", False, False),
    ("May 27, 2044", "May 27, 2044\nextra", True, False),
    ("#### 1,234", "#### 1234.", True, True),
])
def test_docs_eval_examples(reference, generation, flexible, strict):
    assert score(generation, extract_answer(reference)) == (flexible, strict)


def test_peft_lora_on_untied_head_evaluates_like_peft_merge(tmp_path):
    """eval binds an adapter as merge and inspect do: a PEFT LoRA on the output head of an untied
    model (before: refused, 'module lm_head does not exist') gives the loss of PEFT's own merged
    model."""
    import warnings

    import fixtures
    from helpers import chat_rows
    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.filterwarnings("ignore")
    base = fixtures.make_tiny_llama(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(6)))
    torch.manual_seed(0)
    model = get_peft_model(resolve(str(base)).load(dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "p", save_embedding_layers=False)
    merged = PeftModel.from_pretrained(resolve(str(base)).load(dtype=torch.float32),
                                       tmp_path / "p").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    resolve(str(base)).tokenizer().save_pretrained(tmp_path / "merged")
    opts = EvalOptions(generate=False, device="cpu", dtype="fp32")
    got = evaluate(str(tmp_path / "p"), data, opts)
    ref = evaluate(str(tmp_path / "merged"), data, opts)
    base_loss = evaluate(str(base), data, opts)["loss"]
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 and abs(got["loss"] - base_loss) > 1e-3


@pytest.mark.parametrize("chat", [True, False])
def test_generation_stops_where_train_ends_an_answer(tiny_llama, chat):
    """Generation stops at the token train puts after an answer even when the model's EOS is
    another one (a base model with a chat template, e.g. Qwen2.5: EOS <|endoftext|>, turns end with
    <|im_end|>): for chat rows the template's end-of-turn token, for prompt/completion rows the
    tokenizer's EOS. The model is scripted to say "42", that token, then "\\n9...": before, the
    generation ran on ("42\\n9999", last number 9: scored wrong)."""
    from adaptedit.evaluate import Item, generate

    src = resolve(str(tiny_llama))
    model, tok = src.load(dtype=torch.float32), src.tokenizer()
    unk = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = unk  # the model's EOS is not the answer's end
    if chat:
        tok.eos_token = "<|endoftext|>"  # the tokenizer's neither: only the template's turn end
    end = tok.convert_tokens_to_ids("<|im_end|>")
    four, two = tok("42", add_special_tokens=False)["input_ids"]
    newline, nine = tok("\n9", add_special_tokens=False)["input_ids"]
    script = [four, two, end, newline, nine]
    calls = []

    def force(module, args, out):  # the next token is the script's, whatever the input
        k = min(len(calls), len(script) - 1)
        calls.append(k)
        forced = torch.full_like(out, -1e4)
        forced[..., -1, script[k]] = 1e4
        return forced

    model.get_output_embeddings().register_forward_hook(force)
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 40 plus 2?"}],
                                         tokenize=False, add_generation_prompt=True)
    else:
        prompt = "What is 40 plus 2?"
    [text] = generate(model, tok, [Item(prompt, "42", not chat)], 8, torch.device("cpu"))
    assert text == "42" and score(text, "42") == (True, False)


@pytest.mark.parametrize("row", [
    {"prompt": "Q: x?", "completion": " y", "answer": ""},   # e.g. an empty CSV answer cell
    {"prompt": "Q: x?", "completion": " so ####"},
    {"messages": [{"role": "user", "content": "x?"}, {"role": "assistant", "content": " "}]},
])
def test_an_empty_reference_answer_is_refused(trained, tmp_path, row):
    """An empty reference was scored, and matched an empty generation (a model that stops at once
    had 100% on such rows); now it is one line naming file and line."""
    d, _ = trained
    f = tmp_path / "e.jsonl"
    good = {k: v for k, v in row.items() if k != "answer"} if "answer" in row else \
        {"prompt": "Q: 1+1?", "completion": " 2"} if "prompt" in row else rows(1, 0)[0]
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    assert score("", extract_answer(row.get("answer", "####"))) == (True, False)  # why it matters
    code, out, err = run_cli(["eval", str(d / "ad"), "--data", str(f), "--max-new-tokens", "2"])
    assert code == 1 and err.startswith(f"error: {f}:2: the reference answer is empty"), err
    assert len(err.strip().splitlines()) == 1


def test_chat_template_as_train(trained, tmp_path):
    """eval --chat-template FILE renders chat rows as train --chat-template does: the eval loss of
    an adapter trained with a template equals train's eval loss with it (eval had no such option,
    and its error told the user to pass one)."""
    from helpers import PLAIN_TEMPLATE

    d, _ = trained
    tpl = tmp_path / "plain.jinja"
    tpl.write_text(PLAIN_TEMPLATE)
    cfg, given = make_config({"data": str(d / "train.jsonl"), "eval_data": str(d / "valid.jsonl"),
                              "steps": 2, "batch_size": 4, "lr": 1e-2, "save_every": 0,
                              "chat_template": str(tpl)})
    summary = training.train(training.prepare(d / "ad", cfg, given=given, out=tmp_path / "ad"))
    code, out, err = run_cli(["eval", str(tmp_path / "ad"), "--data", str(d / "valid.jsonl"),
                              "--chat-template", str(tpl), "--no-generate", "--json", "--quiet"])
    assert code == 0, err
    with_tpl = json.loads(out)
    assert with_tpl["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    plain = evaluate(str(tmp_path / "ad"), d / "valid.jsonl", EvalOptions(generate=False))
    assert abs(plain["loss"] - with_tpl["loss"]) > 1e-3  # the fixture's own template: other context
    g = evaluate(str(tmp_path / "ad"), d / "valid.jsonl",
                 EvalOptions(max_new_tokens=4, limit=2, chat_template=str(tpl)))
    assert all(x["prompt"].endswith("### assistant:\n") for x in g["generations"])


def test_no_mask_prompt_as_train(trained, tmp_path):
    """eval --no-mask-prompt scores every token, as train --no-mask-prompt's eval loss does."""
    d, _ = trained
    cfg, given = make_config({"data": str(d / "train.jsonl"), "eval_data": str(d / "valid.jsonl"),
                              "steps": 2, "batch_size": 4, "lr": 1e-2, "save_every": 0,
                              "mask_prompt": False})
    summary = training.train(training.prepare(d / "ad", cfg, given=given, out=tmp_path / "ad"))
    code, out, err = run_cli(["eval", str(tmp_path / "ad"), "--data", str(d / "valid.jsonl"),
                              "--no-mask-prompt", "--no-generate", "--json", "--quiet"])
    assert code == 0, err
    r = json.loads(out)
    assert r["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    masked = evaluate(str(tmp_path / "ad"), d / "valid.jsonl", EvalOptions(generate=False))
    assert masked["tokens"] < r["tokens"]
