"""How the distillation loop runs its networks (the blended extractor and the teacher): the
flattened last feature map under autocast, block by block with activation checkpointing,
channels-last inputs or compiled blocks as the config and plan ask, and features cast to float32
(and L2-normalised) for the matching maths."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ncfm_core import cf
from ncfm_core.models import ConvNet

__all__ = ["LoopForward"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _CompiledOrEager:
    """``torch.compile(module)`` that falls back to the eager module, for good, the first time
    compiling or running the compiled code raises (no compiler, an unsupported op)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.compiled: Callable[[Tensor], Tensor] | None = torch.compile(module, dynamic=False)

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as err:  # noqa: BLE001 - any failure of the compiler means: run eagerly
                warnings.warn(f"torch.compile failed, running eagerly: {type(err).__name__}: {err}", stacklevel=2)
                self.compiled = None
        return self.module(x)


class LoopForward:
    """Forwards of ``nets`` (each built once; looked up by identity) on ``device_type``.

    ``precision``: ``fp32`` or ``bf16``/``fp16`` autocast for the network forwards only;
    ``checkpointing``: a ConvNet's blocks recompute their activations in the backward;
    ``channels_last``: NHWC inputs; ``compile_blocks``: ConvNet blocks through torch.compile,
    eager once it fails (never with checkpointing: recomputation re-enters the blocks under
    autograd hooks, which compiled graphs are not worth the risk for); ``normalize``: features
    L2-normalised per row.
    """

    def __init__(self, nets: Sequence[nn.Module], *, device_type: str, precision: str, checkpointing: bool,
                 channels_last: bool, compile_blocks: bool, normalize: bool) -> None:
        self.device_type, self.precision, self.checkpointing = device_type, precision, checkpointing
        self.channels_last, self.normalize = channels_last, normalize
        self._blocks: dict[int, list[Callable[[Tensor], Tensor]]] = {}
        for net in nets:  # ConvNets run block by block; any other network as a whole
            blocks = list(net.blocks) if isinstance(net, ConvNet) else []
            self._blocks[id(net)] = [_CompiledOrEager(b) for b in blocks] if compile_blocks and not checkpointing else blocks

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=self.device_type, dtype=dtype)

    def raw_features(self, net: nn.Module, images: Tensor, *, grad: bool) -> Tensor:
        """``net``'s flattened last feature map (B, d), under autocast if asked, with per-block
        checkpointing when ``grad`` and checkpointing are on."""
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        blocks = self._blocks[id(net)]
        with self.autocast():
            if not blocks:
                return net.features(x)
            h = net.normalize(x)
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False) if grad and self.checkpointing else block(h)
            return h.flatten(1)

    def embed(self, raw: Tensor) -> Tensor:
        """Features for the matching maths: float32 (see ``ncfm_core.distill``), normalised if asked."""
        features = raw.float()
        return cf.normalize_features(features) if self.normalize else features
