"""Where and how computation runs: device, precision, threads, seeds.

Passed explicitly to every loop; nothing here is global state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from typing import Literal

import numpy as np
import torch

from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The processor's model name (recorded with results: speeds differ between machines)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def processor_name(device: torch.device) -> str:
    """What does the work on ``device``: the GPU's name on CUDA (its host CPU says nothing of its
    speed), else the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPU only with native bf16 dot products (AVX512-BF16 or AMX);
    on AVX2-only processors it was measured 18-33x slower than fp32."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise TsbdError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TsbdError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TsbdError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Device, precision and thread count for one run."""

    device: torch.device
    precision: str  # resolved: "bf16" or "fp32"
    threads: int
    # torch.compile for plain cross-entropy training (tsbd.train.fit): "on", "off", or "auto" (long
    # runs time both and keep the faster)
    compile: str = "off"

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", threads: int | None = None,
               compile: bool | str | None = "off") -> Runtime:
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = threads
        if dev.type == "cpu":
            torch.set_num_threads(n)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(dev, prec, n, compile_mode(compile))

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        out = {"device": str(self.device), "precision": self.precision, "threads": self.threads, "cpu": cpu_name()}
        if self.compile != "off":
            out["compile"] = self.compile
        if self.device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out


COMPILE_MODES = ("auto", "on", "off")


def compile_mode(value: bool | str | None) -> str:
    """``--compile`` / ``--no-compile`` / neither (True / False / None) or a mode name, as a mode."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in COMPILE_MODES:
        raise TsbdError(f"compile mode {value!r} is not one of {', '.join(COMPILE_MODES)}")
    return value


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
