"""Generate the demo tasks in examples/ (stdlib only, deterministic).

    python examples/make_data.py

dates/       "Write the date 1987-03-05 in words." → "March 5, 1987"         (chat messages)
arithmetic/  two-step word problems a + b − c, values < 70, one numeric answer (chat messages)

Each task gets train (400), valid (40) and test (40) files with no question shared between splits.
"""

import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
SIZES = {"train": 400, "valid": 40, "test": 40}
NAMES = ["Tom", "Mary", "Ana", "Ravi", "Lena", "Omar", "Kenji", "Sofia", "Paul", "Zoe"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells"]
TEMPLATES = [
    "{n} has {a} {x}. {p} buys {b} more and gives away {c}. How many {x} does {n} have now?",
    "{n} had {a} {x}, found {b} more, then lost {c}. How many {x} does {n} have?",
    "A box holds {a} {x}. {n} adds {b} {x} and takes out {c}. How many {x} are in the box?",
    "{n} collected {a} {x} on Monday and {b} on Tuesday, then gave {c} to a friend. How many {x} are left?",
]


def dates(rng: random.Random):
    while True:
        y, m = rng.randint(1900, 2099), rng.randint(1, 12)
        d = rng.randint(1, DAYS[m - 1])
        yield (f"Write the date {y:04d}-{m:02d}-{d:02d} in words.", f"{MONTHS[m - 1]} {d}, {y}")


def arithmetic(rng: random.Random):
    while True:
        a, b = rng.randint(2, 69), rng.randint(2, 69)
        c = rng.randint(1, min(69, a + b - 1))
        n = rng.choice(NAMES)
        q = rng.choice(TEMPLATES).format(n=n, p="She" if n in ("Mary", "Ana", "Lena", "Sofia", "Zoe")
                                         else "He", a=a, b=b, c=c, x=rng.choice(ITEMS))
        yield q, str(a + b - c)


def write(folder: Path, gen, chat: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    seen = set()
    for split, size in SIZES.items():
        rows = []
        while len(rows) < size:
            q, a = next(gen)
            if q in seen:
                continue
            seen.add(q)
            rows.append({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]} if chat
                        else {"prompt": q, "completion": a})
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    here = Path(__file__).parent
    write(here / "dates", dates(random.Random(1987)), chat=True)
    write(here / "arithmetic", arithmetic(random.Random(70)), chat=True)
