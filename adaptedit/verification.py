"""Check a merged model folder against the model it should equal: logits on fixed prompts.

    max |Δlogit| ≤ TOLERANCE[dtype] · max(1, max |logit|)

The reference is built in memory by the caller (:func:`verify`'s ``prepare_reference``); the
merged folder is loaded by transformers itself, so the check also covers the files: shard names,
the index, dtypes, tied weights. NaN or Inf on either side is a failure, never a pass.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from adaptedit.errors import AdapteditError
from adaptedit.models import ModelSource

VERIFY_PROMPTS = ["The capital of France is", "Write the date 1987-03-05 in words.",
                  "Tom has 23 apples. He buys 15 more and gives away 9."]
# max |Δlogit| allowed between the adapter model and the merged folder, relative to max(1, |logit|)
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 2e-1}


def fits_in_memory(model_bytes: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Verification loads the base (+adapter) and the merged model: about 3× the model size."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, AttributeError):
        return True, ""
    need = 3 * model_bytes * max(1, dtype.itemsize // 2)
    if need > avail:
        return False, (f"the model needs about {need / 2**30:.1f} GiB to compare, "
                       f"{avail / 2**30:.1f} GiB available")
    return True, ""


def _inputs(source: ModelSource):
    try:
        tok = source.tokenizer()
        ids = [tok(p, return_tensors="pt")["input_ids"] for p in VERIFY_PROMPTS]
        ids = [i for i in ids if i.numel() > 0]
        if ids:
            return ids
    except AdapteditError:
        pass
    vocab = int(getattr(source.config, "vocab_size", 100) or 100)
    return [torch.arange(1, 9).remainder(vocab).unsqueeze(0)]


def _forward(model, ids) -> torch.Tensor:
    # an encoder-decoder (T5 ...) needs decoder inputs: the same ids, so both stacks are compared
    extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    with torch.no_grad():
        out = model(input_ids=ids, **extra)
    return (out.logits if getattr(out, "logits", None) is not None else out[0]).float()


def verify(source: ModelSource, merged_dir: Path, dtype: torch.dtype, prepare_reference, *,
           changed=frozenset()) -> tuple[float, float]:
    """Run fixed prompts through the reference model and through the merged folder; returns
    (max |Δlogit|, tolerance) or refuses with one line.

    The reference is the base loaded in ``dtype`` and handed to ``prepare_reference(model)``, which
    adapts it in memory (merge: the adapter attached, or the combined ΔW added to the weights).
    ``changed``: the checkpoint keys the merge rewrote. The folder holds the base's keys, so an
    unexpected key outside them is the base's own (e.g. old GPT-2 checkpoints' attn.masked_bias,
    which transformers drops from the base too); a rewritten one would lose its update.
    """
    from adaptedit.models import quiet_transformers

    quiet_transformers()
    ids = _inputs(source)
    ref = source.load(dtype=dtype)
    prepare_reference(ref)
    ref_out = [_forward(ref, i) for i in ids]
    del ref
    cls = source.model_class()
    try:
        kwargs = {"trust_remote_code": True} if source.trust_remote_code else {}
        merged, info = cls.from_pretrained(merged_dir, dtype=dtype, output_loading_info=True,
                                           use_safetensors=True, **kwargs)
    except Exception as e:
        raise AdapteditError(f"verification: transformers cannot load the merged model "
                             f"({str(e).splitlines()[0][:200]})") from None
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys") or () if k in changed]
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        raise AdapteditError(f"verification: the merged model loads with {bad[0].replace('_', ' ')}: "
                             f"{sorted(map(str, info[bad[0]]))[:3]}")
    merged.eval()
    diff, scale = 0.0, 1.0
    for i, r in zip(ids, ref_out):
        if not bool(torch.isfinite(r).all()):
            raise AdapteditError("verification failed: the base with the adapter gives NaN or Inf "
                                 "logits, so nothing can be compared; nothing was written (is the "
                                 "base or the adapter broken?)")
        m = _forward(merged, i)
        if not bool(torch.isfinite(m).all()):
            raise AdapteditError("verification failed: the merged model gives NaN or Inf logits; "
                                 "nothing was written (merge with --dtype bf16 or fp32?)")
        d = float((m - r).abs().max())
        diff = d if not d <= diff else diff  # a NaN is kept, never dropped
        scale = max(scale, float(r.abs().max()))
    tol = TOLERANCE.get(dtype, 1e-3) * scale
    if not (math.isfinite(diff) and math.isfinite(tol) and diff <= tol):
        raise AdapteditError(f"verification failed: max |Δlogit| {diff:.3g} between the adapter "
                             f"model and the merged model exceeds {tol:.3g}; nothing was written "
                             "(pass --no-verify to write it anyway)")
    return diff, tol
