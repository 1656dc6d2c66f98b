"""Where a computation runs: the device, the compute dtype, and data parallelism under torchrun.

    resolve_device("auto" | "cpu" | "cuda" | "cuda:N")   the device (init, inspect)
    pick_device(device, Dist())                           the same, plus this process's GPU (train, eval)
    pick_dtype("auto" | "bf16" | "fp16" | "fp32", device)  auto: bf16 (fp16 without it) on GPU, fp32 on CPU

Data parallel: each process (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set by torchrun) holds the
whole model; :func:`sum_grads` sums the gradients with one all-reduce (NCCL on GPU, gloo on CPU).
One process is a no-op everywhere.
"""

from __future__ import annotations

import contextlib
import os
import resource

import torch

from adaptedit.errors import AdapteditError, UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Dist:
    """Data parallel under torchrun (WORLD_SIZE > 1); a no-op for one process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def stop(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when present, else cpu; a CUDA device without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapteditError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def pick_device(device: str, dist: Dist) -> torch.device:
    """As :func:`resolve_device`; plain ``cuda`` (and any GPU under torchrun) becomes this
    process's GPU, ``cuda:LOCAL_RANK``, made the current one."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dist.world > 1 or str(dev) == "cuda":
            dev = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(dev)
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in ``dtype`` (the adapter's float32 master weights stay float32); nothing
    for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sum_grads(params, dist: Dist) -> None:
    """One all-reduce (sum) of every gradient, flattened into a single buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([t.reshape(-1) for t in grads])
    dist.sum(flat)
    i = 0
    for p, t in zip(params, grads):
        n = t.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n
