"""compare: every output file with numbers consistent with each other and with independent
computations (eval, init + train run separately), identical settings → identical curves, SIGKILL +
--resume equal to an uninterrupted comparison, bad input refused before any training, and the
statistics against hand computations."""

import base64
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptedit import compare_stats
from adaptedit.compare import CompareOptions, match_params, trainable_count

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
METHODS = "lora,pissa+dora"  # a random init and an SVD init with the DoRA modifier
SEEDS, LRS, STEPS = (1, 2), (1e-3, 1e-2), 6


def rows(n, seed):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a + b}"}]})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-data")
    for name, n, seed in (("train", 24, 0), ("valid", 8, 1), ("test", 6, 2)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
    (d / "retain.jsonl").write_text("".join(
        json.dumps({"text": f"The quick brown fox jumps over the lazy dog {i} times."}) + "\n"
        for i in range(4)))
    return d


def args(base, data, out, *extra):
    return [str(base), "--data", str(data / "train.jsonl"), "--eval-data",
            str(data / "valid.jsonl"), "--test-data", str(data / "test.jsonl"), "--retain-data",
            str(data / "retain.jsonl"), "--methods", METHODS, "--lr", ",".join(map(str, LRS)),
            "--seeds", ",".join(map(str, SEEDS)), "--steps", str(STEPS), "--batch-size", "4",
            "--eval-every", "3", "--rank", "4", "--max-new-tokens", "4", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_llama, data):
    out = tmp_path_factory.mktemp("compare") / "run"
    code, stdout, err = run_cli(["compare", *args(tiny_llama, data, out)])
    assert code == 0, err
    return out, stdout, err


def records(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_every_file_with_consistent_numbers(done, data):
    out, stdout, err = done
    recs = records(out)
    assert len(recs) == 2 * len(SEEDS) * len(LRS)
    assert {(r["method"], r["lr"], r["seed"]) for r in recs} == {
        (m, lr, s) for m in METHODS.split(",") for lr in LRS for s in SEEDS}
    for name in ("summary.json", "report.md", "report.html", "compare.json", "loss_curves.png",
                 "eval_loss.png", "final_metric.png", "geometry.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base_retain = json.loads((out / "base_retain.json").read_text())["retain_loss"]
    for r in recs:
        for key in ("run", "method", "seed", "lr", "rank", "params", "path", "train_loss",
                    "eval_loss", "test", "geometry", "seconds"):
            assert key in r, key
        assert [s for s, _ in r["train_loss"]] == list(range(1, STEPS + 1))
        assert [s for s, _ in r["eval_loss"]] == [0, 3, 6]
        assert r["final_eval_loss"] == r["eval_loss"][-1][1]
        assert "generations" not in r["test"] and r["test"]["n_scored"] == 6
        assert r["forgetting"] == pytest.approx(r["retain_loss"] - base_retain, abs=1e-12)
        # the run folder is a normal adapter folder whose metrics are the record's curve
        metrics = [json.loads(x) for x in (Path(r["path"]) / "metrics.jsonl").read_text().splitlines()]
        assert [[m["step"], m["loss"]] for m in metrics if "loss" in m] == r["train_loss"]
        g = r["geometry"]
        assert 0 <= g["e_top"] <= 1 and 0 <= g["e_bottom"] <= 1 and g["fro"] > 0
        assert -1 <= g["corr_md"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_method"] == "lora"
    for spec, m in summary["methods"].items():
        mine = [r for r in recs if r["method"] == spec]
        by_lr = {lr: [r["final_eval_loss"] for r in mine if r["lr"] == lr] for lr in LRS}
        assert m["best_lr"] == min(by_lr, key=lambda lr: sum(by_lr[lr]))  # chosen on eval data
        at = sorted((r for r in mine if r["lr"] == m["best_lr"]), key=lambda r: r["seed"])
        vals = [r["test"]["loss"] for r in at]
        assert m["metrics"]["test_loss"]["mean"] == pytest.approx(sum(vals) / len(vals))
        assert m["metrics"]["test_loss"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** .5)
        assert m["params"] == at[0]["params"]
    md = (out / "report.md").read_text()
    for spec in METHODS.split(","):
        assert f"| {spec} |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "src=\"http" not in html
    first = re.search(r"base64,([A-Za-z0-9+/=]+)", html).group(1)
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    # the final table on stdout, the live lines on stderr
    assert "| lora |" in stdout and "| pissa+dora |" in stdout
    assert "done" in err and "left" in err


def test_test_numbers_equal_an_independent_eval(done, data):
    from adaptedit.evaluate import EvalOptions, evaluate

    out, _, _ = done
    r = records(out)[-1]
    res = evaluate(r["path"], data / "test.jsonl", EvalOptions(max_new_tokens=4, batch_size=4),
                   retain_data=data / "retain.jsonl")
    assert res["loss"] == pytest.approx(r["test"]["loss"], abs=1e-6)
    assert res["exact_match"] == r["test"]["exact_match"]
    assert res["retain_loss"] == pytest.approx(r["retain_loss"], abs=1e-6)


def test_a_run_equals_init_then_train(done, tmp_path):
    """The recorded commands, run as separate `adaptedit init` + `adaptedit train`, give the same
    tensors bit for bit and the same loss curve (for an SVD init with DoRA and a random init)."""
    out, _, _ = done
    for r in records(out)[::5][:2]:
        folder = Path(r["path"])
        mine = tmp_path / r["run"]
        for cmd in (r["commands"]["init"], r["commands"]["train"]):
            argv = [a if a != str(folder) else str(mine) for a in shlex.split(cmd)[1:]]
            code, _, err = run_cli(argv + ["-q"])
            assert code == 0, (cmd, err)
        a, b = load_file(str(folder / "adapter.safetensors")), load_file(str(mine / "adapter.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (r["run"], k)
        losses = [[m["step"], m["loss"]] for m in map(json.loads, (mine / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
        assert losses == r["train_loss"]


def test_identical_settings_identical_curves(done, tiny_llama, data, tmp_path):
    out, _, _ = done
    again = tmp_path / "again"
    code, _, err = run_cli(["compare", *args(tiny_llama, data, again), "-q"])
    assert code == 0, err
    a, b = records(out), records(again)
    for x, y in zip(a, b):
        assert x["run"] == y["run"]
        for key in ("train_loss", "eval_loss", "test", "retain_loss", "params"):
            if key == "test":
                x[key].pop("data"), y[key].pop("data")
            assert x[key] == y[key], (x["run"], key)
        assert x["geometry"]["e_top"] == y["geometry"]["e_top"]


def test_resume_after_sigkill_equals_uninterrupted(done, tiny_llama, data, tmp_path):
    out, _, _ = done
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # same threads as this process: same sums
    proc = subprocess.Popen([sys.executable, "-m", "adaptedit", "compare",
                             *args(tiny_llama, data, killed), "-q"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mid = killed / "runs" / "lora_lr0.01_seed1" / "checkpoints" / "step-000003"
    t0 = time.time()
    while not mid.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    n_before = len(records(killed)) if (killed / "results.jsonl").exists() else 0
    assert n_before < 8
    code, _, err = run_cli(["compare", *args(tiny_llama, data, killed, "--resume"), "-q"])
    assert code == 0, err
    a, b = records(out), records(killed)
    assert [x["run"] for x in a] == [x["run"] for x in b]
    for x, y in zip(a, b):
        for key in ("train_loss", "eval_loss", "retain_loss", "forgetting", "params"):
            assert x[key] == y[key], (x["run"], key)
        assert x["test"]["loss"] == y["test"]["loss"]
        ta = load_file(str(Path(x["path"]) / "adapter.safetensors"))
        tb = load_file(str(Path(y["path"]) / "adapter.safetensors"))
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (x["run"], k, (ta[k] - tb[k]).abs().max())
    # a changed setting is refused, naming it
    code, _, err = run_cli(["compare", *args(tiny_llama, data, killed, "--resume"),
                            "--steps", "7"])
    assert code != 0 and "--steps" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--methods", "lora,nosuch"], "unknown method"),
    (["--methods", "lora,lora+nosuch"], "unknown modifier"),
    (["--method-option", "pissa:lr=1e-3"], "not in --methods"),
    (["--method-option", "lora:nosuch=1"], "unknown key"),
    (["--lr", ","], "empty list"),
    (["--lr", "0,1e-3"], "positive"),
    (["--rank", "100000"], "exceeds"),
    (["--budget", "flops"], "--budget"),
    (["--jobs", "99"], "--jobs"),
    (["--seeds", "1,1"], "--seeds"),
    # init's own checks: they ran in the first run, after -o was written
    (["--seeds", "1,-1"], "--seed -1"),
    (["--device", "tpu"], "--device"),
    (["--alpha", "-1"], "--alpha"),
    (["--svd", "exact"], "--svd"),
    (["--method-option", "lora:niter=-1"], "--niter"),
    (["--methods", "lora,hra", "--alpha", "8"], "--alpha does not apply to hra"),
])
def test_bad_input_refused_before_training(tiny_llama, data, tmp_path, extra, message):
    out = tmp_path / "bad"
    code, stdout, err = run_cli(["compare", *args(tiny_llama, data, out), *extra])
    assert code != 0 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("flag", ["--test-limit", "--max-new-tokens"])
def test_test_options_without_test_data_are_refused(tiny_llama, data, tmp_path, flag):
    """--test-limit or --max-new-tokens with no --test-data was silently ignored (no test
    metrics, exit 0)."""
    out = tmp_path / "c"
    code, _, err = run_cli(["compare", str(tiny_llama), "--data", str(data / "train.jsonl"),
                            "--eval-data", str(data / "valid.jsonl"), "--methods", "lora",
                            "--steps", "1", flag, "4", "-o", str(out)])
    assert code == 2 and f"{flag} applies to --test-data" in err, err
    assert not out.exists()


def test_existing_folder_refused(done, tiny_llama, data):
    out, _, _ = done
    code, _, err = run_cli(["compare", *args(tiny_llama, data, out)])
    assert code != 0 and "--resume" in err


# ----------------------------------------------------------------------------- statistics


def test_t_quantile_against_closed_forms():
    assert compare_stats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-9)
    assert compare_stats.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-9)
    assert compare_stats.t_quantile(0.975, 4) == pytest.approx(2.7764451052, abs=1e-8)  # printed tables
    assert compare_stats.t_quantile(0.975, 9) == pytest.approx(2.2621571628, abs=1e-8)


def test_paired_interval_by_hand():
    # d = [0.5, 1.0, 2.5]: mean 4/3, s = √(13/12), half = t(0.975, 2)·s/√3
    a, b = {1: 1.0, 2: 2.0, 3: 4.0}, {1: 0.5, 2: 1.0, 3: 1.5}
    half = 0.95 / math.sqrt(0.04875) * math.sqrt(13 / 12) / math.sqrt(3)
    p = compare_stats.paired(a, b, True)
    assert p["mean"] == pytest.approx(4 / 3) and p["std"] == pytest.approx(math.sqrt(13 / 12))
    assert (p["low"], p["high"]) == pytest.approx((4 / 3 - half, 4 / 3 + half))
    assert p["verdict"] == "within seed noise"  # -1.25 < 0 < 3.92
    p = compare_stats.paired({1: 1.0, 2: 1.1, 3: 0.9}, {1: 2.0, 2: 2.05, 3: 1.95}, True)
    assert p["high"] < 0 and p["verdict"] == "better"  # lower loss, interval clear of 0
    assert compare_stats.paired({1: 2.0, 2: 2.05, 3: 1.95}, {1: 1.0, 2: 1.1, 3: 0.9}, False)["verdict"] == "better"
    assert compare_stats.paired({1: 1.0}, {1: 2.0}, True)["low"] is None  # one seed: no interval
    # only shared seeds are paired
    assert compare_stats.paired({1: 1.0, 2: 2.0, 9: 50.0}, {1: 0.0, 2: 1.0, 7: 0.0}, True)["n"] == 2
    # the same difference on every seed (exact match 31/40 vs 30/40 twice): the t-interval would be
    # [d, d], "better" with certainty from two seeds; there is no interval without spread
    p = compare_stats.paired({1: 31 / 40, 2: 31 / 40}, {1: 30 / 40, 2: 30 / 40}, False)
    assert p["low"] is None and p["std"] == 0 and p["mean"] == pytest.approx(1 / 40)
    assert p["verdict"] == "the same difference on every seed: no interval"
    assert compare_stats.paired({1: 0.5, 2: 0.5}, {1: 0.5, 2: 0.5}, True)["verdict"] == \
        "no difference on any seed"


def test_best_lr_is_chosen_on_eval_never_test():
    def rec(method, lr, seed, ev, test):
        return {"run": f"{method}{lr}{seed}", "method": method, "lr": lr, "seed": seed, "rank": 4,
                "params": 10, "final_eval_loss": ev, "test": {"loss": test}, "train_loss": [[1, 1.0]],
                "geometry": {}}
    # lr 0.1 is better on test, lr 0.01 on eval: eval decides
    res = [rec("m", 0.1, s, 2.0 + s / 10, 0.5) for s in (1, 2)] + \
          [rec("m", 0.01, s, 1.0 + s / 10, 3.0) for s in (1, 2)]
    out = compare_stats.summarize(res, ["m"], {}, CompareOptions())
    m = out["methods"]["m"]
    assert m["best_lr"] == 0.01
    assert m["metrics"]["final_eval_loss"]["mean"] == pytest.approx(1.15)
    assert m["metrics"]["final_eval_loss"]["std"] == pytest.approx(0.1 / math.sqrt(2))


def test_loss_at_fractions():
    curve = [[i, float(i)] for i in range(1, 21)]  # 20 steps, windows of 2
    assert compare_stats.loss_at(curve, 0.1) == 1.5 and compare_stats.loss_at(curve, 0.5) == 9.5
    assert compare_stats.loss_at(curve, 1.0) == 19.5


def test_budget_params_matches_the_count(tiny_llama):
    from adaptedit.init import InitOptions, build, parameter_counts, plan
    from adaptedit.models import resolve

    source = resolve(str(tiny_llama))
    targets, _ = plan(source, InitOptions(rank=4))
    goal = trainable_count(targets, InitOptions(method="lora", rank=4))
    opts = InitOptions(method="lora", dora=True, rank=4)
    r, n = match_params(targets, opts, goal)
    built = parameter_counts(source, build(source, InitOptions(method="lora", dora=True, rank=r)))[0]
    assert n == built  # the count is the real adapter's
    for other in range(1, 9):  # and no rank comes closer
        c = parameter_counts(source, build(source, InitOptions(method="lora", dora=True,
                                                                rank=other)))[0]
        assert abs(c - goal) >= abs(n - goal)


def test_shared_svd_computes_once_and_equals_the_plain_svd(monkeypatch):
    from adaptedit import linalg

    w = torch.randn(3, 12, 7, generator=torch.Generator().manual_seed(0))
    plain = [linalg.extreme_svd(w, 2, minor) for minor in (False, True)]
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    with linalg.shared_svd():
        got = [linalg.extreme_svd(w.clone(), 2, minor) for minor in (False, True, False, True)]
    assert len(calls) == 3  # one SVD per matrix for the top and bottom triplets of four callers
    for a, b in zip(plain * 2, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the exact float64 top/bottom triplets
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert torch.equal(plain[0][1], s[:, :2]) and torch.equal(plain[1][1], s[:, -2:])
    linalg.extreme_svd(w, 2, False)
    assert len(calls) == 3 + 1 + 3  # the reference above, and outside the block nothing is kept


@pytest.mark.parametrize("which", ["--data", "--eval-data", "--test-data"])
def test_a_bad_data_row_is_refused_before_the_folder_exists(tiny_llama, data, tmp_path, which):
    """The rows are checked before -o is created: after fixing the file, the same -o works (it
    used to fail inside the first run, leaving -o behind and --resume refusing the changed file;
    a bad --test-data row failed after the first run had trained)."""
    bad = tmp_path / "bad.jsonl"
    good = (data / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:2] + ['{"prompt": "a"}'] + good[2:]) + "\n")
    files = {"--data": str(data / "train.jsonl"), "--eval-data": str(data / "valid.jsonl"),
             "--test-data": str(data / "test.jsonl")}
    files[which] = str(bad)
    out = tmp_path / "c"
    code, _, err = run_cli(["compare", str(tiny_llama), *(x for k, v in files.items()
                                                          for x in (k, v)),
                            "--methods", "lora", "--steps", "1", "-o", str(out)])
    assert code == 1 and err.startswith(f"error: {bad}:3: has 'prompt' but no 'completion'"), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_runs_train_on_the_device_compare_loaded_the_base_on(tiny_llama, data, tmp_path,
                                                            monkeypatch):
    """--device reaches train as well as init and eval: the base is loaded once on --device and the
    runs train it there (train used its own default, auto, so on a GPU machine --device cpu put
    the batches on the GPU and the model on the CPU)."""
    from adaptedit import train as training
    from adaptedit.compare import compare

    seen = []
    real = training.prepare
    monkeypatch.setattr(training, "prepare",
                        lambda folder, cfg, **kw: seen.append(cfg.device) or real(folder, cfg, **kw))
    compare(CompareOptions(data=str(data / "train.jsonl"), eval_data=str(data / "valid.jsonl"),
                           model=str(tiny_llama), methods=["lora"], steps=1, batch_size=4,
                           device="cpu"), out=tmp_path / "c")
    assert seen == ["cpu"]


def test_learning_rates_equal_to_6_digits_are_two_runs(tiny_llama, data):
    """Run ids printed lr with :g, so 1e-4 and 1.0000001e-4 shared one id (one folder, and the
    first run's record counted for both); each id now names its learning rate exactly."""
    from adaptedit.compare import lr_text, plan
    from adaptedit.models import resolve

    lrs = [1e-4, 1.0000001e-4, 2e-5, 3e-4]
    runs, _ = plan(CompareOptions(data=str(data / "train.jsonl"), eval_data=str(data / "valid.jsonl"),
                                  model=str(tiny_llama), methods=["lora"], lrs=lrs, seeds=[0, 1],
                                  steps=1), resolve(str(tiny_llama)))
    ids = [r.id for r in runs]
    assert len(set(ids)) == len(ids) == 8
    assert [lr_text(x) for x in lrs] == ["0.0001", "0.00010000001", "2e-05", "0.0003"]
    assert all(float(lr_text(x)) == x for x in lrs)


def test_a_diverged_learning_rate_is_a_result_not_an_abort(tiny_llama, data, tmp_path):
    """An lr whose loss becomes non-finite is recorded as diverged (kept in results.jsonl, so
    --resume does not redo it), is never chosen as the best lr, and a method with no stable lr has
    no result; one such lr aborted the whole comparison, and --resume could not get past it."""
    from adaptedit.compare import compare

    opts = CompareOptions(data=str(data / "train.jsonl"), eval_data=str(data / "valid.jsonl"),
                          model=str(tiny_llama), methods=["lora", "pissa"], lrs=[1e-3, 1e30],
                          seeds=[0, 1], steps=3, batch_size=4, device="cpu",
                          method_options=["pissa:lr=1e30"])
    compare(opts, out=tmp_path / "c")
    results = [json.loads(x) for x in (tmp_path / "c" / "results.jsonl").read_text().splitlines()]
    bad = {r["run"]: r["diverged"] for r in results if r.get("diverged")}
    assert sorted(bad) == ["lora_lr1e+30_seed0", "lora_lr1e+30_seed1",
                           "pissa_lr1e+30_seed0", "pissa_lr1e+30_seed1"]
    assert all(re.match(r"(loss|gradient norm) is (nan|inf)", why) for why in bad.values()), bad
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["methods"]["lora"]["best_lr"] == 1e-3
    assert list(summary["methods"]) == ["lora"] and "pissa" in summary["diverged"]
    grid = {(g["method"], g["lr"]): g for g in summary["grid"]}
    assert grid["lora", 1e30]["diverged_seeds"] == [0, 1] and grid["lora", 1e-3]["diverged_seeds"] == []
    report = (tmp_path / "c" / "report.md").read_text()
    assert "diverged on 2 of 2 seeds" in report and "**pissa: no result**" in report
    compare(opts, out=tmp_path / "c", resume=True)  # nothing to redo
    assert len((tmp_path / "c" / "results.jsonl").read_text().splitlines()) == len(results)


def test_chat_template_reaches_every_run(tiny_llama, data, tmp_path):
    """compare --chat-template FILE: the runs train and are evaluated with it (final eval loss =
    eval --chat-template of the run's adapter), and the recorded train command carries it."""
    from helpers import PLAIN_TEMPLATE

    from adaptedit.compare import compare
    from adaptedit.evaluate import EvalOptions, evaluate

    tpl = tmp_path / "plain.jinja"
    tpl.write_text(PLAIN_TEMPLATE)
    res = compare(CompareOptions(data=str(data / "train.jsonl"), eval_data=str(data / "valid.jsonl"),
                                 model=str(tiny_llama), methods=["lora"], steps=2, batch_size=4,
                                 lrs=[1e-2], device="cpu", chat_template=str(tpl)),
                  out=tmp_path / "c")
    (run,) = res.runs
    assert f"--chat-template {tpl}" in run["commands"]["train"]
    ours = evaluate(run["path"], data / "valid.jsonl", EvalOptions(generate=False,
                                                                   chat_template=str(tpl)))
    assert run["final_eval_loss"] == pytest.approx(ours["loss"], rel=1e-6)
    other = evaluate(run["path"], data / "valid.jsonl", EvalOptions(generate=False))
    assert abs(other["loss"] - ours["loss"]) > 1e-3
    settings = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert settings["settings"]["chat_template"] == str(tpl) and "chat_template" in settings["sha256"]
