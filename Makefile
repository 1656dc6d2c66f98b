# The commands of the README. Each sets up .venv first (scripts/setup.sh is idempotent).
.PHONY: setup demo test test-all compare compare-families

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

# The default run (what CI runs): everything except the tests marked slow (real embedded models).
test: setup
	.venv/bin/python -m pytest tests -m "not slow"

# Everything, including the slow real-model tests (tens of minutes on 2 CPU cores).
test-all: setup
	.venv/bin/python -m pytest tests

# The shipped comparison of docs/compare.md on the embedded SmolLM2-135M-Instruct (CPU, ~40 min on
# one core): 6 methods × 2 learning rates × 3 seeds on examples/arithmetic. Output: $(COMPARE_OUT).
COMPARE_OUT ?= compare-out
compare: setup
	mkdir -p $(COMPARE_OUT)
	head -n 12 examples/arithmetic/valid.jsonl > $(COMPARE_OUT)/valid12.jsonl
	OMP_NUM_THREADS=1 .venv/bin/python -m adaptedit compare smollm2-135m \
	  --data examples/arithmetic/train.jsonl --eval-data $(COMPARE_OUT)/valid12.jsonl \
	  --test-data examples/arithmetic/test.jsonl --test-limit 16 --max-new-tokens 4 \
	  --methods lora,pissa,milora,lora+dora,pissa+dora,delora --rank 16 --targets q_proj,v_proj \
	  --lr 2e-4,1e-3 --seeds 1,2,3 --steps 12 --batch-size 4 --max-length 80 --eval-every 6 \
	  -o $(COMPARE_OUT)/run $(COMPARE_FLAGS)

# The cross-family comparison of docs/compare.md (one method per hypothesis family at matched
# trainable-parameter budgets, each at its default lr; ~25 min on one core). Output: $(COMPARE_OUT)-families.
compare-families: setup
	mkdir -p $(COMPARE_OUT)-families
	head -n 12 examples/arithmetic/valid.jsonl > $(COMPARE_OUT)-families/valid12.jsonl
	OMP_NUM_THREADS=1 .venv/bin/python -m adaptedit compare smollm2-135m \
	  --data examples/arithmetic/train.jsonl --eval-data $(COMPARE_OUT)-families/valid12.jsonl \
	  --test-data examples/arithmetic/test.jsonl --test-limit 16 --max-new-tokens 4 \
	  --methods lora,pissa,oft,svft,vera,lora+dora --rank 4 --budget params --targets q_proj,v_proj \
	  --method-option svft:svft_pattern=banded --method-option svft:svft_off_diagonals=10 \
	  --method-option svft:lr=5e-3 \
	  --seeds 1,2,3 --steps 12 --batch-size 4 --max-length 80 --eval-every 6 \
	  -o $(COMPARE_OUT)-families/run $(COMPARE_FLAGS)
