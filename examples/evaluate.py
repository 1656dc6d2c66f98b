"""Exact-match accuracy of a causal LM on a held-out file, with greedy decoding.

    python examples/evaluate.py MODEL --data examples/dates/test.jsonl [--limit 40] [--show 3]

MODEL is anything adaptedit accepts (a folder such as a merged output, a hub id, a .gguf file, or
smollm2-135m). Rows are {"prompt", "completion"} or chat {"messages": [...]} whose last message is
the assistant's answer; the prompt is rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from adaptedit.models import resolve


def load_rows(path: str) -> list[tuple[list[dict], str]]:
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "messages" in r:
                rows.append((r["messages"][:-1], r["messages"][-1]["content"]))
            else:
                rows.append(([{"role": "user", "content": r["prompt"]}], r["completion"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--show", type=int, default=3, help="print this many examples")
    args = ap.parse_args()

    source = resolve(args.model, quiet=False)
    model, tok = source.load(dtype=torch.float32), source.tokenizer()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = load_rows(args.data)[: args.limit]
    start, correct, shown = time.perf_counter(), 0, 0
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i:i + args.batch_size]
        prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                   for m, _ in batch]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for (messages, want), ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            got = tok.decode(ids, skip_special_tokens=True).strip()
            correct += got == want.strip()
            if shown < args.show:
                print(f"  Q: {messages[-1]['content']}\n     -> {got!r} (expected {want!r})")
                shown += 1
    acc = correct / max(len(rows), 1)
    print(f"exact match: {correct}/{len(rows)} = {acc:.0%} ({time.perf_counter() - start:.0f} s)")
    json.dump({"model": args.model, "exact_match": acc, "n": len(rows)}, sys.stderr)
    sys.stderr.write("\n")


if __name__ == "__main__":
    main()
