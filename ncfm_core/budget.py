"""Device detection (and, with the memory-budget work, run planning).

``resolve_device("auto")`` picks CUDA, then MPS, then CPU and says why, so the choice can be
logged and stored in the manifest.
"""

from __future__ import annotations

import torch

from ncfm_core.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(requested: str = "auto") -> tuple[torch.device, str]:
    """Return (device, reason). Explicit requests for a missing accelerator are errors."""
    name = requested.lower()
    base = name.split(":", 1)[0]
    if base not in DEVICE_CHOICES:
        raise ConfigError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if base == "auto":
        if cuda_ok:
            return torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        if mps_ok:
            return torch.device("mps"), "auto: Apple MPS available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    if base == "cuda" and not cuda_ok:
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    if base == "mps" and not mps_ok:
        raise ConfigError("--device mps was requested but MPS is not available; use --device cpu or auto")
    return torch.device(name), "requested"
