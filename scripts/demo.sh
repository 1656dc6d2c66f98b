#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct: init → train → inspect → merge, then load the
# merged folder with plain transformers and measure exact match on held-out items before and after.
# Run through `make demo` (which sets up .venv first). Outputs go to demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${DEMO_OUT:-demo-out}
DATA=examples/dates
STEPS=${DEMO_STEPS:-40}
mkdir -p "$OUT"

echo "== 1. the model: adaptable modules of the embedded default (smollm2-135m)"
adaptedit modules --targets q_proj --quiet | tail -n 8

echo "== 2. base model on held-out items"
adaptedit eval smollm2-135m --data $DATA/test.jsonl --limit 40 --max-new-tokens 16 --batch-size 20

echo "== 3. init: PiSSA, rank 16, all linear layers, from the model's own SVD"
adaptedit init smollm2-135m --method pissa --rank 16 -o "$OUT/adapter" --force

echo "== 4. train: $STEPS steps on $DATA/train.jsonl (prompt masked, answer + end of turn trained)"
adaptedit train "$OUT/adapter" --data $DATA/train.jsonl --eval-data $DATA/valid.jsonl \
  --steps "$STEPS" --batch-size 8 --lr 2e-4 --warmup 4 --eval-every 20 --save-every 20

echo "== 5. inspect: where the update lives"
adaptedit inspect "$OUT/adapter" --top 8 --plot "$OUT/plots" --html "$OUT/report.html"

echo "== 6. merge into deployable safetensors (verified against the adapter model)"
adaptedit merge "$OUT/adapter" -o "$OUT/merged" --force

echo "== 7. the merged folder, loaded by plain transformers"
python - "$OUT/merged" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
msgs = [{"role": "user", "content": "Write the date 2011-08-23 in words."}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print("merged model:", repr(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
PY
echo "== 8. exact match of the merged model on the same held-out items"
adaptedit eval "$OUT/merged" --data $DATA/test.jsonl --limit 40 --max-new-tokens 16 --batch-size 20
echo "== done: adapter in $OUT/adapter, merged model in $OUT/merged, report in $OUT/report.html"
