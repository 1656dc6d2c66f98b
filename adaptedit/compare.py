"""Adapter methods as controlled experiments (``adaptedit compare``).

A comparison is a grid of runs, method × learning rate × seed. Every run starts from the same base,
sees the same data in the same order for a given seed (the seed fixes data order and random
inits), the same batch, steps, schedule and evaluation points. Each run is a normal adapter folder
``OUT/runs/<run-id>/`` made by the library path of ``adaptedit init`` (:func:`adaptedit.init.build`
+ :func:`adaptedit.adapter.save_adapter`) followed by that of ``adaptedit train``
(:func:`adaptedit.train.prepare` + :func:`adaptedit.train.train`): the run is exactly the two
commands recorded in its ``commands`` field — same tensors, same loss curve.

Shared work: the base model is loaded once per process and the adapters are attached to it in
turn; W₀'s exact SVD is computed once per weight batch for all SVD-initialised runs
(:func:`adaptedit.linalg.shared_svd`); inspect's cached SVD of W₀ serves the geometry of every run;
the base model's retain loss is computed once.

Outputs (see docs/compare.md): ``compare.json`` (the settings; ``--resume`` refuses to change
them), ``results.jsonl`` (one line per finished run, appended), ``summary.json``, ``report.md``,
``report.html`` and the PNGs (:mod:`adaptedit.compare_report`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from adaptedit import compare_budget as budget
from adaptedit import methods
from adaptedit.atomic import check_output, replace_file
from adaptedit.compare_budget import match_params, trainable_count  # noqa: F401  (public here)
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.init import InitOptions

SCHEMA = "adaptedit.compare"
SETTINGS, RESULTS, SUMMARY = "compare.json", "results.jsonl", "summary.json"
RUNS = "runs"
# InitOptions fields a --method-option may set (the rest is the experiment's: method, seed, device)
INIT_KEYS = tuple(f.name for f in fields(InitOptions) if f.name not in ("method", "dora", "seed",
                                                                         "device", "options"))
OPTION_KEYS = INIT_KEYS + ("lr",)
RANK_OPTIONS = {"block_size"}  # method options that fix the size instead of the rank (OFT)


@dataclass
class CompareOptions:
    data: str = ""
    eval_data: str = ""
    model: str | None = None  # None: the embedded default
    test_data: str | None = None
    retain_data: str | None = None
    methods: list = field(default_factory=lambda: ["lora"])
    rank: int | None = None  # None: each method's default (init's); refused for unranked methods
    alpha: float | None = None  # None: each method's default
    lrs: list | None = None  # None: each method's default learning rate
    seeds: list = field(default_factory=lambda: [0])
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    max_length: int = 1024
    eval_every: int = 0
    save_every: int | None = None  # None: --eval-every when set, else train's 100
    lr_schedule: str = "cosine"
    warmup: float = 0.0
    targets: str = "all-linear"
    svd: str = "full"  # exact: seed-independent and shared by every SVD-initialised run
    budget: str = "rank"  # rank | params
    method_options: list = field(default_factory=list)  # "METHOD:KEY=VALUE"
    max_new_tokens: int = 16
    test_limit: int | None = None
    chat_template: str | None = None  # Jinja file for 'messages' rows (train's and eval's)
    device: str = "auto"
    dtype: str = "auto"
    jobs: int = 1


# options that define the experiment: --resume refuses to change them (jobs, device may change)
LOCKED = tuple(f.name for f in fields(CompareOptions) if f.name not in ("jobs", "device"))


@dataclass
class RunSpec:
    id: str
    method: str  # the spec, e.g. "pissa+dora"
    seed: int
    lr: float
    init: dict  # InitOptions fields
    train: dict  # TrainConfig fields given explicitly

    def commands(self, base: str, folder: Path) -> dict:
        """The two commands this run is equal to."""
        i = self.init
        ini = [f"adaptedit init {base} --method {i['method']}" + (" --dora" if i["dora"] else "")]
        if i["rank"] is not None:
            ini.append(f"--rank {i['rank']}")
        ini.append(f"--seed {i['seed']}")
        defaults = InitOptions()
        for k in INIT_KEYS:
            if k != "rank" and i[k] != getattr(defaults, k) and i[k] is not None:
                ini.append(f"--{k.replace('_', '-')}" + ("" if i[k] is True else f" {i[k]}"))
        for k, v in (i.get("options") or {}).items():  # the method's own options (init's flags)
            ini.append(f"--{k.replace('_', '-')} {v}")
        tr = [f"adaptedit train {folder}"] + [f"--{k.replace('_', '-')} {v}"
                                              for k, v in self.train.items() if v is not None]
        return {"init": " ".join(ini) + f" -o {folder}", "train": " ".join(tr)}


# ------------------------------------------------------------------------------------ the plan


def parse_method_options(items: list, specs: list) -> dict:
    """["pissa:lr=2e-5,5e-5", "oft:block_size=16"] → {spec: {key: value}}; a key of the method's
    own ``OPTIONS`` (init's flag of that name) goes under "options"."""
    out: dict = {s: {} for s in specs}
    types = {f.name: f.type for f in fields(InitOptions)}
    for item in items:
        head, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not eq or not head.strip() or not key:
            raise UsageError(f"--method-option {item!r}: use METHOD:KEY=VALUE, e.g. pissa:lr=2e-5")
        head = head.strip()
        if head not in out:
            raise UsageError(f"--method-option {item!r}: {head} is not in --methods "
                             f"({', '.join(specs)}); add it there or drop the option")
        own = methods.get(methods.parse_spec(head)[0])
        if key not in OPTION_KEYS and key not in own.OPTIONS:
            known = OPTION_KEYS + tuple(own.OPTIONS)
            raise UsageError(f"--method-option {item!r}: unknown key {key!r}; known: "
                             f"{', '.join(known)}")
        if key in ("rank", "rank_pattern") and not own.RANKED:
            raise UsageError(f"--method-option {item!r}: {own.name} has no rank; drop the option")
        try:
            if key in own.OPTIONS and key not in OPTION_KEYS:
                out[head].setdefault("options", {})[key] = _option_value(value,
                                                                         own.OPTIONS[key])
            elif key == "lr":
                out[head][key] = parse_floats(value, "--method-option lr")
            elif "bool" in types[key]:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[head][key] = value.lower() in ("true", "1")
            elif "int" in types[key]:
                out[head][key] = int(value)
            elif "float" in types[key]:
                out[head][key] = float(value)
            else:
                out[head][key] = value
        except ValueError:
            raise UsageError(f"--method-option {item!r}: {value!r} is not a valid {key}") from None
    return out


def _option_value(text: str, default):
    """A method option's value, typed like its default (int, float, str; None: a number)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError
        return text.lower() in ("true", "1")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, str):
        return text
    number = float(text)
    return int(number) if number == int(number) and "." not in text and "e" not in text.lower() \
        else number


def lr_text(lr: float) -> str:
    """A learning rate in a run id: 6 significant digits (2e-05), or every digit it needs to stay
    distinct (1.0000001e-4 and 1e-4 are two runs, not one id counted twice)."""
    short = f"{lr:g}"
    return short if float(short) == lr else repr(lr)


def parse_floats(text: str, name: str) -> list:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise UsageError(f"{name}: empty list; give at least one value, e.g. {name} 1e-4,3e-4")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"{name} {text!r}: not a comma list of numbers") from None
    if any(not (math.isfinite(v) and v > 0) for v in vals):
        raise UsageError(f"{name} {text!r}: every value must be a positive number")
    if len(set(vals)) != len(vals):
        raise UsageError(f"{name} {text!r}: a value appears twice")
    return vals


def validate(opts: CompareOptions) -> None:
    """Checks that need no model (one-line errors, before anything is read or written)."""
    if not opts.data or not opts.eval_data:
        raise UsageError("--data and --eval-data are required (the best learning rate is chosen "
                         "on --eval-data)")
    for name in ("data", "eval_data", "test_data", "retain_data"):
        p = getattr(opts, name)
        if p is not None and not Path(p).is_file():
            raise AdapteditError(f"--{name.replace('_', '-')} {p}: no such file")
    if not opts.methods:
        raise UsageError("--methods: empty list; e.g. --methods lora,pissa")
    specs = [methods.spec_name(*methods.parse_spec(s)) for s in opts.methods]
    if len(set(specs)) != len(specs):
        raise UsageError(f"--methods {','.join(opts.methods)}: a method appears twice")
    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        raise UsageError("--seeds: give distinct seeds, e.g. --seeds 1,2,3")
    if opts.lrs is not None and not opts.lrs:
        raise UsageError("--lr: empty list; give at least one value, e.g. --lr 1e-4,3e-4")
    if opts.budget not in ("rank", "params"):
        raise UsageError(f"--budget {opts.budget!r}: use rank or params")
    if opts.rank is not None and opts.rank < 1:
        raise UsageError(f"--rank {opts.rank}: must be a positive integer")
    if opts.rank is not None:  # an explicit rank is applied or refused, never ignored
        for spec in specs:
            name = methods.parse_spec(spec)[0]
            if not methods.get(name).RANKED:
                raise UsageError(f"--rank does not apply to {name} (it has no rank); drop --rank "
                                 "(each method then has its default) or give the ranked methods "
                                 "theirs with --method-option METHOD:rank=R")
    if opts.jobs < 1:
        raise UsageError("--jobs must be ≥ 1")
    if opts.jobs > 1 and (not torch.cuda.is_available() or torch.cuda.device_count() < opts.jobs):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UsageError(f"--jobs {opts.jobs}: one run per GPU, and {n} GPU(s) are visible; "
                         "use --jobs 1 on CPU")
    if opts.max_new_tokens < 1 or (opts.test_limit is not None and opts.test_limit < 1):
        raise UsageError("--max-new-tokens and --test-limit must be ≥ 1")
    if opts.test_limit is not None and opts.test_data is None:
        raise UsageError("--test-limit applies to --test-data, which is not given; add --test-data "
                         "FILE or drop --test-limit")
    parse_method_options(opts.method_options, specs)


def plan(opts: CompareOptions, source) -> tuple[list, dict]:
    """All runs, validated against the model (ranks, targets) and train's option checks.

    Returns (runs, per-method info {spec: {rank, params, lrs}})."""
    from adaptedit.init import check as check_init
    from adaptedit.init import plan as plan_targets
    from adaptedit.init import targets_spec
    from adaptedit.targets import select
    from adaptedit.train_config import make_config, method_lr

    validate(opts)
    specs = [methods.spec_name(*methods.parse_spec(s)) for s in opts.methods]
    mopts = parse_method_options(opts.method_options, specs)
    base_train = dict(data=opts.data, eval_data=opts.eval_data, steps=opts.steps,
                      epochs=opts.epochs, batch_size=opts.batch_size, max_length=opts.max_length,
                      lr_schedule=opts.lr_schedule, warmup=opts.warmup, eval_every=opts.eval_every,
                      save_every=opts.save_every if opts.save_every is not None
                      else (opts.eval_every or None), device=opts.device, dtype=opts.dtype,
                      chat_template=opts.chat_template)
    make_config({**base_train, "lr": 1.0, "seed": 0})  # train's own checks, before any run
    info, runs, target, first = {}, [], None, None
    for spec in specs:
        name, flags = methods.parse_spec(spec)
        method = methods.get(name)
        extra = {k: v for k, v in mopts[spec].items() if k != "lr"}
        init_kw = {**{k: getattr(InitOptions(), k) for k in INIT_KEYS}, "alpha": opts.alpha,
                   "targets": opts.targets, "svd": opts.svd, "rank": opts.rank, **extra,
                   "method": name, "dora": flags.get("dora", False), "device": opts.device}
        init_kw.setdefault("options", {})
        probe = InitOptions(**{**init_kw, "seed": 0})
        for seed in opts.seeds:  # init's own checks (seed, device, alpha, svd...): before any run
            check_init(InitOptions(**{**init_kw, "seed": seed}))
        matched = (opts.budget == "params" and target is not None and method.RANKED
                   and "rank" not in extra and not init_kw["options"].keys() & RANK_OPTIONS)
        if matched:  # the rank is chosen here: only the targets are needed (unknown: refused)
            targets = select(source.targets, targets_spec(probe))
            init_kw["rank"], params = match_params(targets, probe, target)
            _, ranks = plan_targets(source, InitOptions(**{**init_kw, "seed": 0}))
        else:  # unknown targets, a rank the method refuses (> min(out, in) ...): refused here
            targets, ranks = plan_targets(source, probe)
            params = trainable_count(targets, probe)
        if opts.budget == "params" and target is not None:
            budget.check(spec, method.RANKED, params, target, first, init_kw["rank"])
        if target is None:
            target, first = params, spec
        rank = init_kw["rank"]
        if rank is None and method.RANKED and len(set(ranks.values())) == 1:
            rank = next(iter(ranks.values()))  # the method's default, as init records it
        lrs = mopts[spec].get("lr") or opts.lrs or [method_lr(name)]
        info[spec] = {"rank": rank if method.RANKED else None, "params": params, "lrs": lrs}
        if opts.budget == "params":
            info[spec]["budget"] = {"target": target, "ratio": params / target if target else None,
                                    "how": "sets the budget" if spec == first else
                                    "matched rank" if matched else
                                    "fixed (no rank)" if not method.RANKED else "rank given"}
        for lr in lrs:
            for seed in opts.seeds:
                run_id = f"{spec}_lr{lr_text(lr)}_seed{seed}"
                train_kw = {k: v for k, v in {**base_train, "lr": lr, "seed": seed}.items()
                            if v is not None and k not in ("device",)}
                runs.append(RunSpec(run_id, spec, seed, lr, {**init_kw, "seed": seed}, train_kw))
    return runs, info


def settings_record(opts: CompareOptions, info: dict, runs: list) -> dict:
    from adaptedit.rows import sha256_file

    s = asdict(opts)
    files = ("data", "eval_data", "test_data", "retain_data", "chat_template")
    for k in files:
        if s[k]:
            s[k] = str(Path(s[k]).expanduser().absolute())
    hashes = {k: sha256_file(Path(s[k])) for k in files if s[k]}
    return {"schema": SCHEMA, "settings": s, "sha256": hashes, "methods": info,
            "runs": [r.id for r in runs]}


def check_resume(folder: Path, record: dict) -> None:
    """Refuse a --resume whose settings differ from the recorded ones, naming the setting."""
    path = folder / SETTINGS
    if not path.exists():
        raise AdapteditError(f"{folder}: --resume found no {SETTINGS}; not a compare folder "
                             "(or it never started)")
    old = json.loads(path.read_text())
    for k in LOCKED:
        if old["settings"].get(k) != record["settings"].get(k):
            raise UsageError(f"--resume: this command changes --{k.replace('_', '-')} to "
                             f"{record['settings'].get(k)!r} (the comparison has "
                             f"{old['settings'].get(k)!r}); drop it, or start a new comparison "
                             "with -o NEW_DIR")
    for k, h in record["sha256"].items():
        if old["sha256"].get(k) != h:
            raise UsageError(f"--resume: the file of --{k.replace('_', '-')} changed since the "
                             "comparison started (sha256 differs); restore it or use -o NEW_DIR")


# ------------------------------------------------------------------------------------- running


@dataclass
class CompareResults:
    """What a comparison returns: the runs (results.jsonl records), the summary and the files."""

    folder: Path
    runs: list
    summary: dict
    files: dict

    def table(self) -> list:
        return self.summary["table"]


def run_tokenizer(opts: CompareOptions, source):
    """The base's tokenizer as every run uses it (with --chat-template when given)."""
    from adaptedit import data

    tokenizer = source.tokenizer()
    if opts.chat_template:
        data.set_chat_template(tokenizer, Path(opts.chat_template))
    return tokenizer


def check_data(opts: CompareOptions, source) -> None:
    """Read and tokenize the training, eval, retain and test files as every run will (their first
    bad row or missing file is an error now, not when the first run starts or has trained)."""
    from adaptedit import data
    from adaptedit.evaluate import items

    tokenizer = run_tokenizer(opts, source)
    for path in (opts.data, opts.eval_data, opts.retain_data):
        if path:
            data.load(Path(path), tokenizer, max_length=opts.max_length)
    if opts.test_data:  # the rows eval reads: the loss's, then the generation prompts'
        data.load(Path(opts.test_data), tokenizer, max_length=opts.max_length,
                  max_rows=opts.test_limit)
        items(Path(opts.test_data), tokenizer, opts.test_limit)


def compare(opts: CompareOptions, *, out: Path, resume: bool = False, progress=None,
            trust_remote_code: bool = False) -> CompareResults:
    """Run (or resume) the comparison into ``out`` and write every output. ``progress(event,
    info)`` is told "plan", "run_start", "step", "run_end" and "report"."""
    from adaptedit import compare_report, compare_stats
    from adaptedit.compare_run import Runner, read_results
    from adaptedit.models import model_inputs, resolve

    tell = progress or (lambda event, info: None)
    out = Path(out)
    source = resolve(opts.model, trust_remote_code=trust_remote_code)
    runs, info = plan(opts, source)
    record = settings_record(opts, info, runs)
    check_output(out, True, inputs=[opts.data, opts.eval_data, opts.test_data, opts.retain_data,
                                    opts.chat_template,
                                    *model_inputs(source)])  # never an input, even on --resume
    if resume:
        check_resume(out, record)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapteditError(f"-o {out}: already exists; pass --resume to continue that "
                             "comparison, or choose a new folder")
    else:
        check_data(opts, source)  # before -o exists: a bad row is fixed and run again, same -o
    try:
        (out / RUNS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapteditError(f"-o {out}: cannot create ({e.strerror or e})") from None
    if not resume:
        replace_file(out, SETTINGS, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    done = {r["run"]: r for r in read_results(out)}
    todo = [r for r in runs if r.id not in done]
    tell("plan", {"runs": runs, "done": len(done), "todo": len(todo), "methods": info})
    if todo:
        runner = Runner(opts, source, out, tell)
        runner.run_all(todo, done)
    results = [done[r.id] for r in runs if r.id in done]
    summary = compare_stats.summarize(results, [methods.spec_name(*methods.parse_spec(s))
                                                for s in opts.methods], info, opts)
    replace_file(out, SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    files = compare_report.write_all(out, results, summary)
    tell("report", {"files": files})
    return CompareResults(out, results, summary, files)
