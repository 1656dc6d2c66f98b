"""compare's rank and budget for methods without a rank (IA3, RoAd) and with unusual rank rules
(HRA: even; OFT: blocks, whose count falls as r grows; VeRA: not bounded by the shapes): an explicit
--rank is refused where it cannot apply, --budget params matches what can be matched (checked
against the counts of adapters actually built, over every accepted rank) and refuses, in one line
naming the method, a budget it cannot meet."""

from __future__ import annotations

import json
import shlex

import pytest
from helpers import run_cli

from adaptedit import compare_budget
from adaptedit.compare import CompareOptions, match_params, plan, trainable_count
from adaptedit.errors import AdapteditError
from adaptedit.init import InitOptions, build, parameter_counts
from adaptedit.init import plan as init_plan
from adaptedit.models import resolve


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget-data")
    row = {"messages": [{"role": "user", "content": "1 plus 2?"},
                        {"role": "assistant", "content": "3"}]}
    for name in ("train", "valid"):
        (d / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    return d


def cli_args(base, data, out, *extra):
    return ["compare", str(base), "--data", str(data / "train.jsonl"), "--eval-data",
            str(data / "valid.jsonl"), "--steps", "1", "-o", str(out), *extra]


def opts(data, methods, **kw):
    return CompareOptions(data=str(data / "train.jsonl"), eval_data=str(data / "valid.jsonl"),
                          methods=methods, steps=1, **kw)


@pytest.mark.parametrize("extra, message", [
    (["--methods", "lora,ia3", "--rank", "4"], "--rank does not apply to ia3 (it has no rank)"),
    (["--methods", "road", "--rank", "4"], "--rank does not apply to road (it has no rank)"),
    (["--methods", "lora,ia3", "--method-option", "ia3:rank=4"], "ia3 has no rank"),
    (["--methods", "lora,road", "--method-option", "road:rank_pattern=q_proj=2"], "road has no rank"),
    (["--methods", "lora,ia3", "--budget", "params"], "ia3 has no rank, so its"),
    (["--methods", "lora,oft", "--method-option", "oft:nosuch=1"], "unknown key 'nosuch'"),
])
def test_refused_in_one_line_before_anything_is_written(tiny_llama, data, tmp_path, extra,
                                                        message):
    out = tmp_path / "cmp"
    code, _, err = run_cli(cli_args(tiny_llama, data, out, *extra))
    assert code != 0 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_unranked_method_fixed_count_and_commands_without_rank(tiny_llama, data):
    """No --rank: each method's default; IA3 records no rank, its count is the built adapter's, and
    the recorded init command is one that init accepts (no --rank)."""
    source = resolve(str(tiny_llama))
    runs, info = plan(opts(data, ["lora", "ia3", "hra"]), source)
    built = {m: parameter_counts(source, build(source, InitOptions(method=m,
                                                                  targets="all-linear")))[0]
             for m in ("lora", "ia3", "hra")}  # compare's targets: the same for every method
    assert info["ia3"]["rank"] is None and info["lora"]["rank"] == 16 and info["hra"]["rank"] == 8
    for m in built:
        assert info[m]["params"] == built[m]
    cmd = runs[1].commands(str(tiny_llama), "X")["init"]
    assert "--rank" not in cmd and "--method ia3" in cmd
    args = shlex.split(cmd)[1:]
    code, _, err = run_cli(args[:-1] + [str(data.parent / "ia3-from-command")])
    assert code == 0, err


def test_unranked_first_sets_the_budget(tiny_llama, data):
    """IA3 first: its fixed count is the budget; VeRA (a rank not bounded by the shapes) matches
    it as closely as any rank can — checked against every rank by building the adapters."""
    source = resolve(str(tiny_llama))
    runs, info = plan(opts(data, ["ia3", "vera"], budget="params", targets="q_proj,v_proj"),
                      source)
    goal = info["ia3"]["params"]
    assert info["ia3"]["budget"]["how"] == "sets the budget"
    r = info["vera"]["rank"]
    n = parameter_counts(source, build(source, InitOptions(method="vera", rank=r,
                                                           targets="q_proj,v_proj")))[0]
    assert n == info["vera"]["params"] and abs(n / goal - 1) <= compare_budget.TOLERANCE
    for other in range(1, 3 * r):
        c = parameter_counts(source, build(source, InitOptions(method="vera", rank=other,
                                                               targets="q_proj,v_proj")))[0]
        assert abs(c - goal) >= abs(n - goal), other
    assert all(s.init["rank"] == r for s in runs if s.method == "vera")


@pytest.mark.parametrize("method", ["hra", "oft", "vera", "lora"])
def test_match_params_is_the_best_accepted_rank(tiny_llama, method):
    """Against brute force: every rank the method's plan accepts, counted on built adapters."""
    source = resolve(str(tiny_llama))
    targets, _ = init_plan(source, InitOptions(rank=4))
    for goal in (700, 3000, 9000):
        r, n = match_params(targets, InitOptions(method=method, rank=2), goal)
        assert n == parameter_counts(source, build(source, InitOptions(method=method, rank=r)))[0]
        for other in range(1, 80):
            try:
                c = parameter_counts(source, build(source, InitOptions(method=method,
                                                                       rank=other)))[0]
            except AdapteditError:
                continue  # not a rank this method takes here
            assert (abs(c - goal), other) >= (abs(n - goal), r) or c == n, (goal, other)


def test_budget_out_of_reach_is_refused_naming_the_method(tiny_llama, data):
    source = resolve(str(tiny_llama))
    with pytest.raises(AdapteditError, match=r"svft's closest count is .* \(r=16\)"):
        plan(opts(data, ["lora", "svft"], budget="params", method_options=["lora:rank=8"]),
             source)
    # within the tolerance it runs, and the ratio is recorded
    _, info = plan(opts(data, ["lora", "lora+dora"], budget="params"), source)
    b = info["lora+dora"]["budget"]
    assert b["target"] == info["lora"]["params"] and b["how"] == "matched rank"
    assert b["ratio"] == pytest.approx(info["lora+dora"]["params"] / info["lora"]["params"])


def test_method_own_option_reaches_init_and_the_count(tiny_llama, data):
    source = resolve(str(tiny_llama))
    runs, info = plan(opts(data, ["oft"], method_options=["oft:block_size=4"]), source)
    spec = runs[0]
    assert spec.init["options"] == {"block_size": 4}
    assert "--block-size 4" in spec.commands("m", "X")["init"]
    built = build(source, InitOptions(**{**spec.init, "device": "cpu"}))
    assert built.config.init["block_size"] == 4
    assert info["oft"]["params"] == parameter_counts(source, built)[0]
    targets, _ = init_plan(source, InitOptions(method="oft", options={"block_size": 4}))
    assert trainable_count(targets, InitOptions(method="oft", options={"block_size": 4})) == \
        parameter_counts(source, built)[0]


def test_svft_banded_matched_through_its_method_options(tiny_llama, data):
    """A larger form of SVFT (banded, d = 1) reaches a budget plain SVFT cannot; the matched rank's
    count is the count of the adapter init builds with those options."""
    source = resolve(str(tiny_llama))
    mo = ["lora:rank=1", "svft:svft_pattern=banded", "svft:svft_off_diagonals=1"]
    runs, info = plan(opts(data, ["lora", "svft"], budget="params", targets="q_proj,v_proj",
                           method_options=mo), source)
    spec = next(s for s in runs if s.method == "svft")
    assert spec.init["options"] == {"svft_pattern": "banded", "svft_off_diagonals": 1}
    built = build(source, InitOptions(**{**spec.init, "device": "cpu"}))
    assert info["svft"]["params"] == parameter_counts(source, built)[0]
    assert abs(info["svft"]["budget"]["ratio"] - 1) <= compare_budget.TOLERANCE
    assert "--svft-pattern banded --svft-off-diagonals 1" in spec.commands("m", "X")["init"]


def test_matched_method_is_not_refused_for_the_shared_rank(tiny_llama, data):
    """--rank sets the first method's budget; a method whose rank is matched is not first checked
    at that rank (SVFT banded d = 3 cannot take r = 1, and need not)."""
    source = resolve(str(tiny_llama))
    runs, info = plan(opts(data, ["lora", "svft"], rank=1, budget="params",
                           method_options=["svft:svft_pattern=banded",
                                           "svft:svft_off_diagonals=3"]), source)
    assert info["lora"]["rank"] == 1 and info["svft"]["rank"] > 3
    assert abs(info["svft"]["budget"]["ratio"] - 1) <= compare_budget.TOLERANCE


@pytest.mark.parametrize("rank,pattern", [(8, "q_proj=2"), (None, "layers.0=4,v_proj=12")])
def test_the_count_follows_the_rank_pattern(tiny_llama, rank, pattern):
    """trainable_count (what --budget params matches and checks) took one rank per module shape,
    ignoring --rank-pattern; it now counts the adapter init builds with the pattern."""
    source = resolve(str(tiny_llama))
    o = InitOptions(method="lora", rank=rank, rank_pattern=pattern)
    targets, _ = init_plan(source, o)
    assert trainable_count(targets, o) == parameter_counts(source, build(source, o))[0]
