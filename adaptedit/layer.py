"""The adapted layer: a frozen base module plus an adapter's θ (trainable) and θ₀ (buffers).

The output is the method's :meth:`~adaptedit.methods.base.Method.forward`; for the low-rank family

    y = base(x) + Σ coef · B (A x)          added in float32, rounded once to the output dtype

Works for ``nn.Linear`` and GPT-2's ``Conv1D`` (the base module is called as is; methods that need
its weight read it through :meth:`AdaptedLayer.weight`). The base module is never modified.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptedit.adapter import Adapter
from adaptedit.errors import AdapteditError
from adaptedit.targets import layer_kind, to_w


class AdaptedLayer(nn.Module):
    def __init__(self, base: nn.Module, adapter: Adapter, name: str, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.name = name
        self.kind = layer_kind(base)
        self.method = adapter.method
        self.info = adapter.config.modules[name]
        trainable = set(adapter.trainable_names())
        self.params = nn.ParameterDict()
        for key, value in adapter.tensors[name].items():
            value = value.detach().float().clone()
            if key in trainable:
                self.params[key] = nn.Parameter(value)
            else:
                self.register_buffer(f"frozen_{key}", value, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def tensors(self) -> dict:
        """θ and θ₀ of this module as one dict (live parameters, so gradients flow)."""
        t = {k: v for k, v in self.params.items()}
        t.update({n[len("frozen_"):]: b for n, b in self.named_buffers(recurse=False)
                  if n.startswith("frozen_")})
        return t

    def weight(self) -> torch.Tensor:
        """The base weight as (out × in), in its own dtype (a view for Conv1D)."""
        return to_w(self.base.weight, self.kind)

    def terms(self) -> list | None:
        return self.method.terms(self.tensors(), self.info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self, x)


def attach(model: nn.Module, adapter: Adapter, *, dropout: float = 0.0) -> nn.Module:
    """Wrap every adapter module of ``model`` in an :class:`AdaptedLayer` (in place); freeze the base.

    Returns the model. Use :func:`detach` to get the plain base modules back.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in adapter.names:
        base = modules.get(name)
        if base is None:
            raise AdapteditError(f"module {name} of the adapter is not in the model")
        if isinstance(base, AdaptedLayer):
            raise AdapteditError(f"module {name} already carries an adapter")
        info = adapter.config.modules[name]
        w = to_w(base.weight, layer_kind(base) or "linear")
        if list(w.shape) != list(info.shape):
            raise AdapteditError(f"module {name}: adapter expects {info.shape[0]}×{info.shape[1]}, "
                                 f"model has {w.shape[0]}×{w.shape[1]}")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = AdaptedLayer(base, adapter, name, dropout).to(base.weight.device)
        setattr(parent, child, layer)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach`: put the base modules back (the adapter tensors are dropped)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
    return model


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {m.name: m for m in model.modules() if isinstance(m, AdaptedLayer)}


def penalty(model: nn.Module) -> torch.Tensor | None:
    """Σ of the methods' training regularisers over the adapted layers (None when none has one)."""
    total = None
    for layer in adapted_layers(model).values():
        p = layer.method.penalty(layer.tensors(), layer.info)
        if p is not None:
            total = p if total is None else total + p
    return total


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in adapted_layers(model).values() for p in layer.params.values()]


def collect(model: nn.Module, adapter: Adapter) -> Adapter:
    """A new Adapter holding the current θ of the model's adapted layers (θ₀ unchanged)."""
    tensors = {}
    for name, layer in adapted_layers(model).items():
        tensors[name] = {k: v.detach().float().cpu().clone() for k, v in layer.tensors().items()}
    return Adapter(adapter.config, tensors, adapter.path)
