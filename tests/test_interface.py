"""The method interface (adaptedit.methods.base): every registry entry through the same functions,
DoRA as a modifier, no method names outside adaptedit/methods/, and the bf16 forward that adds
ΔW·x in float32 and rounds once (as PEFT does)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import fixtures
import pytest
import torch
from helpers import METHODS, logits, make_adapter, perturb

from adaptedit import methods
from adaptedit.formats import load_adapter
from adaptedit.errors import AdapteditError
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft

PACKAGE = Path(__file__).resolve().parent.parent / "adaptedit"


@pytest.fixture(scope="module")
def tiny_llama_bf16(tmp_path_factory):
    return fixtures.make_tiny_llama(tmp_path_factory.mktemp("llama_bf16"), dtype=torch.bfloat16)


def _refuses_dora(name: str) -> bool:
    return isinstance(getattr(methods.get(name).impl, "DORA", None), str)


@pytest.mark.parametrize("name", METHODS)
def test_registry_entry_states_the_interface(name):
    m = methods.get(name)
    assert m.PAPER and re.search(r"arXiv:\d{4}\.\d{4,5}", m.PAPER)
    assert m.TRAINABLE and all(isinstance(k, str) for k in m.TRAINABLE)
    assert m.LR > 0 and m.default_alpha(8) > 0
    assert m.PEFT is not None  # a mapping, or a sentence saying why there is none
    if _refuses_dora(name):  # a sentence saying why DoRA is not defined on it
        with pytest.raises(AdapteditError, match=f"--dora on {name}: "):
            methods.resolve(name, dora=True)
        return
    d = methods.resolve(name, dora=True)
    assert d.TRAINABLE == m.TRAINABLE + ("magnitude",) and d.label == f"{name}+dora"
    assert not d.has_factors


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dora", [False, True])
def test_delta_is_merged_minus_w_and_factors_agree(tiny_llama, name, dora):
    """ΔW, W' and P@Q of every method describe one update (float64 reference, 1e-5 relative)."""
    if dora and _refuses_dora(name):
        pytest.skip(f"{name} refuses DoRA (test_registry_entry_states_the_interface)")
    rank = 4 if methods.METHODS[name].RANKED else None  # IA3 and RoAd have no rank (one is refused)
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(method=name, rank=rank, dora=dora)), 3)
    src = resolve(str(tiny_llama))
    for mod, info in list(ad.config.modules.items())[:3]:
        w = src.checkpoint.get(info.key).float()
        merged = ad.merged(mod, w).double()
        delta = ad.delta_w(mod, w).double()
        scale = merged.abs().max()
        assert (merged - w.double() - delta).abs().max() <= 1e-6 * scale
        pq = ad.factors(mod)
        assert (pq is None) == (dora or not methods.get(name).has_factors)
        if pq is not None:
            assert (pq[0].double() @ pq[1].double() - delta).abs().max() <= 1e-5 * scale


def test_no_method_names_compared_outside_methods():
    """layer, merge, inspect, export, train: no branch on a method's name (the registry decides)."""
    names = "|".join(map(re.escape, METHODS))
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?[^)\n]*["']({names})["']""")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                found.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_dora_refused_where_a_method_says_so(monkeypatch):
    class NoDora:
        PAPER, TRAINABLE, DORA = "x (arXiv:0000.00000)", ("lora_A",), "not defined here"

    monkeypatch.setitem(methods.METHODS, "nodora", methods.Method("nodora", NoDora))
    monkeypatch.setattr(methods, "_DORA", {})
    with pytest.raises(AdapteditError, match="--dora on nodora: not defined here; drop --dora"):
        methods.resolve("nodora", dora=True)


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |v| (8 significant bits)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -126)))
    return torch.exp2(e - 7)


def test_bf16_forward_adds_in_float32_and_rounds_once(tiny_llama_bf16):
    """y = round_bf16(y₀ + ΔW x): within half an ulp of the float64 sum in every entry. Rounding
    ΔW x to bf16 before the addition (the old forward) misses that by up to an ulp."""
    ad = load_adapter(make_adapter(tiny_llama_bf16, Path(tiny_llama_bf16).parent / "ad",
                                   method="lora"))
    for t in ad.tensors.values():
        t["lora_B"] = t["lora_B"] * 40  # ΔW x of the size of y₀: rounding matters
    model = attach(resolve(str(tiny_llama_bf16)).load(dtype=torch.bfloat16), ad)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        y = layer(x)
        y0 = layer.base(x)
        d = ad.delta_w("model.layers.0.mlp.down_proj").double()
        ref = y0.double() + x.double() @ d.T  # exact sum of the bf16 base output and ΔW x
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    assert bool((err <= 0.5 * _bf16_ulp(ref) + 1e-6 * ref.abs()).all()), float(err.max())
    twice = (y0 + (x.float() @ d.float().T).bfloat16()).double()  # the old forward
    assert bool((twice - ref).abs().gt(0.5 * _bf16_ulp(ref) + 1e-6 * ref.abs()).any())


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_bf16_logits_equal_peft(tiny_llama_bf16, tmp_path, method):
    """PEFT adds the fp32 adapter output to the bf16 base output in float32 and rounds once; so do
    we: the bf16 logits are bit-identical (the old forward differed by up to 3e-3 here)."""
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    ad = load_adapter(make_adapter(tiny_llama_bf16, tmp_path / "ad", method=method))
    export_peft(ad, tmp_path / "p")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = logits(attach(resolve(str(tiny_llama_bf16)).load(dtype=torch.bfloat16), ad), ids)
    peft_model = PeftModel.from_pretrained(resolve(str(tiny_llama_bf16)).load(dtype=torch.bfloat16),
                                           tmp_path / "p").eval()
    assert torch.equal(ours, logits(peft_model, ids))


@pytest.mark.parametrize("name", [n for n, m in methods.METHODS.items() if not m.RANKED])
@pytest.mark.parametrize("field", ["rank", "rank_pattern"])
def test_a_rank_for_a_method_without_one_is_refused_by_the_library(tiny_llama, name, field):
    """init.build refuses it as the CLI does (never a rank silently ignored)."""
    from adaptedit.errors import UsageError
    from adaptedit.init import InitOptions, build
    from adaptedit.models import resolve

    value = 4 if field == "rank" else "q_proj=4"
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UsageError, match=f"^{flag} does not apply to {name} .*drop {flag}$"):
        build(resolve(str(tiny_llama)), InitOptions(method=name, **{field: value}))
