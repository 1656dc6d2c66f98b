"""The method interface: what a method file provides, and the defaults that fill in the rest.

A method is a reparametrization W' = F(W, θ) with F(W, θ₀) = W bit-exactly. Its file provides pure
tensor functions on one module's tensors ``t`` (θ and θ₀, by name) and its ``info``
(:class:`adaptedit.adapter.ModuleInfo`: shape, rank, scaling, kind):

required
    ``PAPER``, ``TRAINABLE`` (the names in ``t`` that training updates; the rest is frozen θ₀),
    ``default_alpha(rank)``,
    ``init(w, opts) -> θ₀`` for a batch ``w`` (b × out × in, float32) of modules of one shape; every
    entry batched along dim 0. ``opts`` holds ``rank``, ``scaling``, ``generator`` and the init
    options (svd, niter, oversample) plus the method's own options (``OPTIONS``);
and either
    ``terms(t, scaling, rank) -> [(coef, B, A), ...]``: ΔW = Σ coef · B @ A (the low-rank family;
    everything else below then has a default), or
    ``merged(w, t, info) -> W'`` dense float32, and ``delta_x(layer, x) -> ΔW x`` float32;
optional
    ``forward(layer, x) -> y`` (a fast path; default y₀ + ΔW x added in float32, rounded once),
    ``delta(w, t, info)`` (default: from ``terms``, else merged − w),
    ``is_identity(t)`` (default: every trainable tensor equals its θ₀ copy "<name>0"),
    ``extras(t, info, w, fro) -> dict`` (what inspect reports only for this method),
    ``VECTORS`` ({name: (kind, label)}, kind "by_index" or "distribution") and
    ``vectors(t, info) -> {name: 1-D tensor}`` (what ``inspect --plot`` draws per singular index
    or as a histogram per layer type: :mod:`adaptedit.method_plots`),
    ``validate(t, info) -> str | None`` (a loaded adapter's tensors; the problem or None),
    ``OPTIONS`` ({option: default}) and ``plan(targets, ranks, options, rank_given) -> (ranks,
    options)`` (resolved against the targets, recorded in adaptedit.json; default: r ≤ min(out,
    in)), ``DEFAULT_RANK`` (16; None: the method sizes modules itself), ``SCALED`` (False: no α,
    no rsLoRA), ``RANKED`` (False: no rank; ``init --rank`` refused), ``TARGETS`` (the default
    ``--targets``; all-linear when absent), ``SVD`` (None | "any" | "full": the init decomposes W),
    ``LR`` (default learning rate) and ``LR_SOURCE``, ``DROPOUT`` (False: input dropout does not
    apply), ``penalty(t, info) -> scalar`` (a training regulariser),
    the PEFT mapping ``PEFT`` (a :class:`PeftMapping`, or a string saying why there is none;
    default for the low-rank family: an exact LoRA of concatenated terms).

:class:`Method` wraps a file into one registry entry with these defaults; :class:`DoRA` wraps an
entry into "that method with DoRA's magnitude on top".
"""

from __future__ import annotations

import torch

from adaptedit.errors import AdapteditError

DEFAULT_LR = 2e-4  # LoRA's, for methods whose paper gives none


def lowrank_delta(terms: list) -> torch.Tensor:
    """Σ coef · B @ A in float32. Each product is computed on its own, so that B = B₀, A = A₀ gives
    exactly zero (the products are bit-identical and their difference is 0)."""
    out = None
    for coef, b, a in terms:
        prod = (b.float() @ a.float()).mul_(coef)  # in place: same bits as (B @ A) * coef
        out = prod if out is None else out + prod
    return out


def concat_factors(terms: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ coef · B A as one product P @ Q: P = [c₁B₁ | c₂B₂ …], Q = [A₁; A₂ …] (float32)."""
    p = torch.cat([c * b.float() for c, b, _ in terms], dim=1)
    q = torch.cat([a.float() for _, _, a in terms], dim=0)
    return p, q


def check_ranks(targets: list, ranks: dict) -> None:
    """Every target's rank is at most min(out, in) of its weight (the low-rank family's limit)."""
    for t in targets:
        r, m = ranks[t.name], min(t.out_features, t.in_features)
        if r > m:
            raise AdapteditError(f"rank {r} for {t.name} exceeds min(out, in) = {m} of its "
                                 f"{t.out_features}×{t.in_features} weight; lower --rank or use "
                                 "--rank-pattern")


class Method:
    """One registry entry: the functions of a method file, with the interface's defaults."""

    dora = False

    def __init__(self, name: str, impl):
        self.name, self.impl = name, impl
        self.PAPER = impl.PAPER
        self.TRAINABLE = tuple(impl.TRAINABLE)
        self.OPTIONS = dict(getattr(impl, "OPTIONS", {}))
        self.SVD = getattr(impl, "SVD", None)
        self.LR = getattr(impl, "DEFAULT_LR", getattr(impl, "LR", DEFAULT_LR))
        self.DEFAULT_LR = self.LR  # train's --lr default
        self.LR_SOURCE = getattr(impl, "LR_SOURCE", None)
        self.DROPOUT = getattr(impl, "DROPOUT", True)
        self.DEFAULT_RANK = getattr(impl, "DEFAULT_RANK", 16)
        self.SCALED = getattr(impl, "SCALED", True)
        self.RANKED = getattr(impl, "RANKED", True)  # False: no rank to choose (--rank refused)
        self.TARGETS = getattr(impl, "TARGETS", None)  # default --targets (None: all-linear)
        self.VECTORS = dict(getattr(impl, "VECTORS", {}))  # {name: (kind, label)}: inspect's plots
        self.lowrank = hasattr(impl, "terms")
        self.PEFT = getattr(impl, "PEFT", None)
        if self.PEFT is None and self.lowrank:
            from adaptedit.methods.peft_lora import CONCAT

            self.PEFT = CONCAT

    def __repr__(self) -> str:
        return f"<method {self.label}>"

    @property
    def label(self) -> str:
        return self.name + ("+dora" if self.dora else "")

    def default_alpha(self, rank: int) -> float:
        return self.impl.default_alpha(rank)

    def plan(self, targets: list, ranks: dict, options: dict, rank_given: bool) -> tuple:
        """(ranks, options) resolved against the targets; the default checks r ≤ min(out, in)."""
        own = getattr(self.impl, "plan", None)
        if own is not None:
            return own(targets, ranks, options, rank_given)
        check_ranks(targets, ranks)
        return ranks, options

    def init(self, w: torch.Tensor, opts: dict) -> dict:
        return self.impl.init(w, opts)

    # --- ΔW and W'

    def terms(self, t: dict, info) -> list | None:
        """ΔW as [(coef, B, A), ...] for the low-rank family, else None."""
        return self.impl.terms(t, info.scaling, info.rank) if self.lowrank else None

    @property
    def has_factors(self) -> bool:
        """ΔW has a known low-rank form (:meth:`factors` is not None)."""
        return self.lowrank or hasattr(self.impl, "factors")

    def factors(self, t: dict, info) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ΔW = P @ Q (P: out × k, Q: k × in, float32) when ΔW has a known low-rank form, else None."""
        own = getattr(self.impl, "factors", None)
        if own is not None:
            return own(t, info)
        return concat_factors(self.terms(t, info)) if self.lowrank else None

    def delta(self, w: torch.Tensor | None, t: dict, info) -> torch.Tensor:
        """ΔW = W' − W, float32 (out × in). Low-rank methods do not need ``w``."""
        own = getattr(self.impl, "delta", None)
        if own is not None:
            return own(w, t, info)
        if self.lowrank:
            return lowrank_delta(self.terms(t, info))
        if w is None:
            raise ValueError(f"{self.label}: ΔW needs the base weight")
        w = w.float()
        return self.merged(w, t, info) - w

    def merged(self, w: torch.Tensor, t: dict, info) -> torch.Tensor:
        """W' dense in float32 (a fresh tensor)."""
        if self.lowrank and not hasattr(self.impl, "merged"):
            d = lowrank_delta(self.terms(t, info))  # fresh float32: add W into it in place
            return d.add_(w.float())  # ΔW + W = W + ΔW bit for bit (IEEE addition commutes)
        return self.impl.merged(w.float(), t, info)

    def is_identity(self, t: dict) -> bool:
        """True when θ still equals θ₀, so that W' = W exactly (by construction)."""
        own = getattr(self.impl, "is_identity", None)
        if own is not None:
            return own(t)
        for key in self.TRAINABLE:
            if f"{key}0" not in t or not torch.equal(t[key], t[f"{key}0"]):
                return False
        return True

    # --- the forward pass of an adapted layer (adaptedit.layer.AdaptedLayer)

    def delta_x(self, layer, x: torch.Tensor) -> torch.Tensor:
        """ΔW x in float32, with the layer's dropout on the trained path."""
        own = getattr(self.impl, "delta_x", None)
        if own is not None:
            return own(layer, x)
        t = layer.tensors()
        delta = None
        for i, (coef, b, a) in enumerate(self.terms(t, layer.info)):
            xi = layer.dropout(x) if i == 0 else x  # dropout on θ only
            h = xi.to(a.dtype) @ a.transpose(-1, -2)  # (…, k)
            part = (h @ b.transpose(-1, -2)) * coef  # (…, out)
            delta = part if delta is None else delta + part
        return delta

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        own = getattr(self.impl, "forward", None)
        if own is not None:
            return own(layer, x)
        y = layer.base(x)
        return (y.float() + self.delta_x(layer, x)).to(y.dtype)  # add in float32, round once

    # --- reports, validation, training

    def extras(self, t: dict, info, w: torch.Tensor | None, fro: float) -> dict:
        own = getattr(self.impl, "extras", None)
        return own(t, info, w, fro) if own is not None else {}

    def vectors(self, t: dict, info) -> dict:
        """{name: 1-D tensor} per module for the names in ``VECTORS`` (inspect plots them by
        singular index or as a distribution per layer type); {} when the method has none."""
        own = getattr(self.impl, "vectors", None)
        return own(t, info) if own is not None else {}

    def validate(self, t: dict, info) -> str | None:
        own = getattr(self.impl, "validate", None)
        if own is not None:
            return own(t, info)
        a, b = t.get("lora_A"), t.get("lora_B")
        if a is not None and b is not None and (a.shape[-1] != info.shape[1]
                                                or b.shape[0] != info.shape[0]):
            return (f"factors {tuple(b.shape)} @ {tuple(a.shape)} do not match the module shape "
                    f"{info.shape}")
        return None

    def penalty(self, t: dict, info):
        own = getattr(self.impl, "penalty", None)
        return own(t, info) if own is not None else None

    def peft(self):
        """The PEFT mapping, or raise with the method's statement of why there is none."""
        if self.PEFT is None or isinstance(self.PEFT, str):
            why = self.PEFT or "no PEFT adapter type computes this update"
            raise AdapteditError(f"method {self.label} has no exact PEFT form: {why}")
        return self.PEFT


class DoRA(Method):
    """DoRA's magnitude on top of a method (see :mod:`adaptedit.methods.dora`):

        W' = m ⊙ V / ‖V‖_row,   V = F(W, θ) the method's own W'.
    """

    dora = True

    def __init__(self, inner: Method):
        from adaptedit.methods import dora

        self.inner, self._d = inner, dora  # the modifier's tensor functions
        self.__dict__.update({k: v for k, v in inner.__dict__.items()
                              if k not in ("dora", "inner", "_d")})
        self.TRAINABLE = inner.TRAINABLE + dora.TRAINABLE
        refusal = getattr(inner.impl, "DORA", None)  # a string: why DoRA is not defined on it
        if isinstance(refusal, str):
            raise AdapteditError(f"--dora on {inner.name}: {refusal}; drop --dora")

    def init(self, w: torch.Tensor, opts: dict) -> dict:
        out = self.inner.init(w, opts)
        out.update(self._d.init(w))
        return out

    has_factors = False  # m/‖V‖ rescales rows: not low-rank

    def terms(self, t, info):
        return None

    def factors(self, t, info):
        return None

    def delta(self, w, t, info):
        if w is None:
            raise ValueError("DoRA's ΔW needs the base weight")
        w = w.float()
        return self.merged(w, t, info) - w

    def merged(self, w, t, info):
        """m/‖V‖ ⊙ V computed directly (not W + (W' − W), which would round twice)."""
        w = w.float()
        return self._d.merged(w, self.inner.delta(w, t, info), t["magnitude"].float())

    def is_identity(self, t: dict) -> bool:
        return ("magnitude0" in t and torch.equal(t["magnitude"], t["magnitude0"])
                and self.inner.is_identity(t))

    def delta_x(self, layer, x):
        raise AdapteditError("DoRA does not stack on DoRA")  # its forward is its own (below)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """y = y₀ + (g − 1) ⊙ (y₀ − b) + g ⊙ ΔW x,  g = m / ‖W + ΔW‖_row (norm detached)."""
        y = layer.base(x)
        delta = self.inner.delta_x(layer, x)
        w = layer.weight().to(delta.dtype)
        t = layer.tensors()
        with torch.no_grad():
            norm = self._d.row_norm(w + self.inner.delta(w, t, layer.info))
        g = t["magnitude"] / norm
        bias = getattr(layer.base, "bias", None)
        y0 = y.to(delta.dtype)
        yw = y0 - bias.to(delta.dtype) if bias is not None else y0
        return (y0 + (g - 1) * yw + g * delta).to(y.dtype)

    def extras(self, t, info, w, fro):
        out = self.inner.extras(t, info, w, fro)
        if "magnitude" in t and "magnitude0" in t:
            m, m0 = t["magnitude"].double(), t["magnitude0"].double()
            out["dora_magnitude_mean_abs"] = float((m - m0).abs().mean())
            out["dora_magnitude_rel"] = float((m - m0).norm() / m0.norm()) if m0.norm() > 0 else None
        return out

    def validate(self, t, info):
        if "magnitude" in t and t["magnitude"].shape[0] != info.shape[0]:
            return f"magnitude has {t['magnitude'].shape[0]} entries for {info.shape[0]} rows"
        return self.inner.validate(t, info)

    def peft(self):
        mapping = self.inner.peft()
        if not mapping.dora:
            raise AdapteditError(f"method {self.label} has no exact PEFT form: PEFT's "
                                 f"{mapping.peft_type} has no DoRA variant")
        return mapping
