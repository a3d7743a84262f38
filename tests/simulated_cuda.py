"""A CUDA machine simulated on the CPU, as far as ncfm's device resolution, planning, precision
and capping can tell; no kernel ever runs on it.

The simulation keeps the contract of the CUDA API where it matters to us: like
``torch.cuda.set_per_process_memory_fraction``, the capping call refuses a device without an
index. Installed with ``monkeypatch.setattr`` by ``tests/test_devices.py``'s fixture, and with
plain ``setattr`` by torchrun children (``tests/test_parallel.py``), which install it before
calling the library.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

GiB = 2**30
SIMULATED_TOTAL = 80 * GiB


class SimulatedCuda:
    """The simulated machine: ``count`` devices, the ``current`` one, whether they run bf16, and
    what the tests saw the CUDA API asked: the memory caps, as (fraction, index)."""

    def __init__(self, count: int, current: int = 0, bf16: bool = True):
        self.count = count
        self.current = current
        self.bf16 = bf16
        self.caps: list[tuple[float, int]] = []

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        # torch's own argument checks: an index is required (None means the current device).
        index = self.current if device is None else torch.cuda._utils._get_device_index(device)
        if not isinstance(fraction, float) or not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        if not 0 <= index < self.count:
            raise RuntimeError(f"invalid device index {index}")
        self.caps.append((fraction, index))


def install(set_attribute: Callable[[Any, str, Any], None] = setattr, count: int = 2) -> SimulatedCuda:
    """Make ``torch.cuda`` report ``count`` 80 GiB devices (bf16-capable until ``machine.bf16``
    is set False) through ``set_attribute`` (``monkeypatch.setattr``, or ``setattr`` in a child
    process); returns the machine."""
    machine = SimulatedCuda(count)
    props = SimpleNamespace(name="Simulated GPU", total_memory=SIMULATED_TOTAL)
    set_attribute(torch.cuda, "is_available", lambda: True)
    set_attribute(torch.cuda, "device_count", lambda: machine.count)
    set_attribute(torch.cuda, "current_device", lambda: machine.current)
    set_attribute(torch.cuda, "get_device_name", lambda device=None: props.name)
    set_attribute(torch.cuda, "get_device_properties", lambda device=None: props)
    set_attribute(torch.cuda, "mem_get_info", lambda device=None: (SIMULATED_TOTAL - GiB, SIMULATED_TOTAL))
    set_attribute(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: machine.bf16)
    set_attribute(torch.cuda, "set_per_process_memory_fraction", machine.set_per_process_memory_fraction)
    return machine
