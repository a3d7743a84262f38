"""How the distillation loop runs its networks (the blended extractor and the teacher): the
flattened last feature map under autocast, block by block with activation checkpointing, in the
memory format, with the casts, compiled blocks and captured graphs the run's kernel levers ask
for (``ncfm_core.kernels``), and features cast to float32 (and L2-normalised) for the matching
maths.

Two entry points compute what one chunk of the loop needs from its networks:
:meth:`LoopForward.real_features` (a real chunk: gather the uint8 images, scale, augment, the
extractor's features; no grad) and :meth:`LoopForward.synthetic_features` (a class group:
decode the stored images, augment, the extractor's features and the teacher's, with their
backward). With the graphs lever each runs as a graph captured once per shape and replayed
(``ncfm_core.graphs``); without it, eagerly, exactly as before the levers.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ncfm_core import augment, cf
from ncfm_core.graphs import GraphContractError, ShapeGraphs, graphs_for, recording
from ncfm_core.kernels import KernelLevers, apply_levers, cast_weights_once
from ncfm_core.models import ConvNet
from ncfm_core.synset import decode_synset

__all__ = ["COMPILE_BACKEND", "CompileFallbackWarning", "LoopForward", "autocast_dtype", "loop_network"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the network forwards autocast to under ``precision`` (None: fp32, no autocast)."""
    return _AUTOCAST_DTYPES.get(precision)


COMPILE_BACKEND = "inductor"  # torch.compile's backend for the compile lever (tests use a lighter one)
RECOMPILE_LIMIT = 1024  # graphs of the blocks' code object compiled per process (see LoopForward.compile_blocks)


def loop_network(spec: Any, levers: KernelLevers, device: torch.device, precision: str) -> nn.Module:
    """A frozen network of the pool's ``spec`` (``ncfm_core.pool.PoolSpec``) on ``device``, in eval
    mode, with the run's kernel levers: its pools and norms switched (``kernels.apply_levers``),
    its memory format (layout nhwc: channels last), and with casts=once under autocast its
    convolution and linear weights held in the compute dtype (``kernels.cast_weights_once``; the
    pool's blend writes them there)."""
    memory_format = torch.channels_last if levers.layout == "nhwc" else torch.contiguous_format
    net = apply_levers(spec.build(), levers)
    net = net.to(device, memory_format=memory_format).requires_grad_(False).eval()
    compute_dtype = autocast_dtype(precision)
    if levers.casts == "once" and compute_dtype is not None:
        cast_weights_once(net, compute_dtype)
    return net


class CompileFallbackWarning(UserWarning):
    """Compiling the blocks (or capturing graphs) failed; the run goes on eagerly."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class _CompiledChain:
    """A network's blocks through ``torch.compile`` with fixed shapes, for the shapes compiled
    before the loop (:meth:`compile_for`) only: any other input runs eagerly, so the loop never
    stops to compile. After a failure, eager for good (one warning)."""

    def __init__(self, blocks: nn.Module, backend: str) -> None:
        self.blocks = blocks
        self.compiled: Callable[[Tensor], Tensor] | None = torch.compile(blocks, dynamic=False, fullgraph=True,
                                                                         backend=backend)
        self.ready: set[Hashable] = set()

    @staticmethod
    def _key(x: Tensor) -> Hashable:
        return tuple(x.shape), x.stride(), x.dtype, x.requires_grad, torch.is_grad_enabled()

    def compile_for(self, x: Tensor) -> Tensor:
        """Run (and so compile) the blocks on ``x``'s shape; errors propagate to the caller."""
        if self.compiled is None:
            return self.blocks(x)
        out = self.compiled(x)
        self.ready.add(self._key(x))
        return out

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled is not None and self._key(x) in self.ready and not recording():
            try:
                return self.compiled(x)
            except torch.OutOfMemoryError:
                raise  # the plan's business, not the compiler's
            except Exception as err:  # noqa: BLE001 - any other failure of compiled code means: run eagerly
                warnings.warn(f"compiled blocks failed, running eagerly: {_first_line(err)}", CompileFallbackWarning,
                              stacklevel=2)
                self.compiled = None
        return self.blocks(x)


class LoopForward:
    """Forwards of ``nets`` (each built once; looked up by identity) on ``device_type``.

    ``precision``: ``fp32`` or ``bf16``/``fp16`` autocast for the network forwards only;
    ``checkpointing``: a ConvNet's blocks recompute their activations in the backward;
    ``levers``: the run's kernel levers (``casts``: the real images scaled in one kernel;
    ``layout``: NHWC inputs; ``compile``: a ConvNet's blocks through torch.compile, once
    :meth:`compile_blocks` has compiled the plan's shapes, never with checkpointing: recomputation
    re-enters the blocks under autograd hooks; ``graphs``: :meth:`real_features` and
    :meth:`synthetic_features` captured once per shape, never with checkpointing either);
    ``normalize``: features L2-normalised per row. The networks themselves (modules, memory
    format, weight dtype) are set up by the caller (``ncfm_core.distill``).
    """

    def __init__(self, nets: Sequence[nn.Module], *, device_type: str, precision: str, checkpointing: bool,
                 levers: KernelLevers, normalize: bool) -> None:
        self.device_type, self.precision, self.checkpointing = device_type, precision, checkpointing
        self.levers, self.normalize = levers, normalize
        self.channels_last = levers.layout == "nhwc"
        self.compile_seconds: float | None = None  # set by compile_blocks
        compiled = levers.compile == "on" and not checkpointing
        self._chains: dict[int, _CompiledChain] = {}
        self._blocks: dict[int, list[Callable[[Tensor], Tensor]]] = {}
        for net in nets:  # ConvNets run block by block (or as one compiled chain); any other network as a whole
            self._blocks[id(net)] = list(net.blocks) if isinstance(net, ConvNet) else []
            if compiled and isinstance(net, ConvNet):
                self._chains[id(net)] = _CompiledChain(net.blocks, COMPILE_BACKEND)
        self.graphs: ShapeGraphs | None = (graphs_for(device_type) if levers.graphs == "on" and not checkpointing
                                           else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        # The weight cache never served the loop (its networks' weights need no gradient) and
        # captured graphs must not use it.
        return torch.autocast(device_type=self.device_type, dtype=dtype, cache_enabled=self.graphs is None)

    def raw_features(self, net: nn.Module, images: Tensor, *, grad: bool) -> Tensor:
        """``net``'s flattened last feature map (B, d), under autocast if asked, with per-block
        checkpointing when ``grad`` and checkpointing are on."""
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        blocks = self._blocks[id(net)]
        with self.autocast():
            if not blocks:
                return net.features(x)
            h = net.normalize(x)
            chain = self._chains.get(id(net))
            if chain is not None:
                return chain(h).flatten(1)
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False) if grad and self.checkpointing else block(h)
            return h.flatten(1)

    def embed(self, raw: Tensor) -> Tensor:
        """Features for the matching maths: float32 (see ``ncfm_core.distill``), normalised if asked."""
        features = raw.float()
        return cf.normalize_features(features) if self.normalize else features

    # -- what a chunk of the loop computes ----------------------------------------------------

    def real_input(self, images: Tensor) -> Tensor:
        """uint8 images -> float32 in [0, 1]: with the casts lever one kernel (the division
        promotes), else a conversion and an in-place division (the same numbers)."""
        if self.levers.casts == "once":
            return torch.div(images, 255.0)
        return images.float().div_(255.0)

    def real_features(self, net: nn.Module, real_images: Tensor, index: Tensor, labels: Tensor,
                      params: dict[str, Tensor]) -> Tensor:
        """Normalised features (n, d) of the real images ``real_images[index]`` (uint8, n rows)
        augmented with ``params`` by their ``labels``' draws; for no-grad use (the caller's
        inference mode). With graphs, a copy of the replayed output (the real side keeps chunks
        for a second pass, and a replay overwrites its output)."""
        names = sorted(params)

        def chunk(index: Tensor, labels: Tensor, *values: Tensor) -> tuple[Tensor]:
            x = augment.apply_params(self.real_input(real_images[index]), labels, dict(zip(names, values)))
            return (self.embed(self.raw_features(net, x, grad=False)),)

        inputs = (index, labels, *(params[name] for name in names))
        if self.graphs is not None:
            try:
                return self.graphs.forward(("real", id(net), index.shape[0]), chunk, inputs)[0].clone()
            except Exception as err:  # noqa: BLE001 - a capture that fails leaves the run eager
                self._graphs_failed(err)
        return chunk(*inputs)[0]

    def synthetic_features(self, extractor: nn.Module, teacher: nn.Module | None, images: Tensor, labels: Tensor,
                           params: dict[str, Tensor], factor: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """A class group's stored ``images`` (requiring grad) and ``labels`` -> (the extractor's
        normalised features of the decoded, augmented images, their labels, and the teacher's
        raw features of the same images, or None without a teacher), differentiable in
        ``images``. With graphs, the outputs (and the gradient reaching ``images``) are the
        replay's: valid until the next group's replay, by which time the loop has used them."""
        names = sorted(params)

        def group(images: Tensor, labels: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
            decoded, syn_labels = decode_synset(images, labels, factor)
            syn_input = augment.apply_params(decoded, syn_labels, dict(zip(names, values)))
            features = self.embed(self.raw_features(extractor, syn_input, grad=True))
            if teacher is None:
                return features, syn_labels
            return features, syn_labels, self.raw_features(teacher, syn_input, grad=True)

        inputs = (images, labels, *(params[name] for name in names))
        outputs = None
        if self.graphs is not None:
            try:
                outputs = self.graphs.differentiable(("synthetic", images.shape[0], teacher is not None), group, inputs)
            except Exception as err:  # noqa: BLE001 - a capture that fails leaves the run eager
                self._graphs_failed(err)
        if outputs is None:
            outputs = group(*inputs)
        return outputs[0], outputs[1], outputs[2] if teacher is not None else None

    def _graphs_failed(self, err: Exception) -> None:
        # our own region breaking the contract is a bug, and running out of memory is the plan's
        # business (the job reports it, exit 4): neither is a reason to go on eagerly
        if isinstance(err, (GraphContractError, torch.OutOfMemoryError)):
            raise err
        self.graphs = None
        warnings.warn(f"CUDA graphs could not capture the loop's work, running eagerly: {_first_line(err)}",
                      CompileFallbackWarning, stacklevel=3)

    # -- compiling before the loop ------------------------------------------------------------

    def compile_blocks(self, extractor: nn.Module, teacher: nn.Module | None, image_shape: tuple[int, int, int],
                       real_rows: Sequence[int], group_rows: Sequence[int],
                       real_mode: Callable[[], contextlib.AbstractContextManager]) -> float | None:
        """Compile the blocks for every shape the plan runs, before the first iteration: the
        extractor's no-grad forward at each real chunk's ``real_rows`` (under ``real_mode``, the
        real side's autograd mode) and, with their backward, the extractor's and the teacher's
        at each class group's ``group_rows`` (decoded images). Returns the seconds it took
        (None when nothing is compiled); a compiler that fails leaves every block eager, with one
        warning (:class:`CompileFallbackWarning`)."""
        if not self._chains:
            return None
        started = time.perf_counter()
        # Each network's blocks are a graph of their own for each shape and autograd mode, all
        # compiled from one code object (nn.Sequential.forward), and every distiller of a process
        # (the benchmarks build several) adds its own: dynamo's default limit of 8 graphs per code
        # object would send the rest back to eager. The loop itself never compiles (only the
        # shapes compiled here run compiled), so the limit only matters here.
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                            accumulated_recompile_limit=4 * RECOMPILE_LIMIT):
                self._compile_shapes(extractor, teacher, image_shape, real_rows, group_rows, real_mode)
        except torch.OutOfMemoryError:
            raise  # the eager blocks would not fit either: the plan's business
        except Exception as err:  # noqa: BLE001 - any other failure of the compiler means: run eagerly
            self._chains.clear()
            warnings.warn(f"torch.compile failed, running eagerly: {_first_line(err)}", CompileFallbackWarning,
                          stacklevel=3)
            return None
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds

    def _compile_shapes(self, extractor: nn.Module, teacher: nn.Module | None, image_shape: tuple[int, int, int],
                        real_rows: Sequence[int], group_rows: Sequence[int],
                        real_mode: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Run each compiled chain once per shape the plan runs, as the loop will (zeros in)."""
        for rows in sorted(set(real_rows)):
            with real_mode(), self.autocast():
                x = torch.zeros(rows, *image_shape, device=self._device_of(extractor))
                self._chains[id(extractor)].compile_for(self._chain_input(extractor, x))
        for rows in sorted(set(group_rows)):
            for net in (extractor, teacher):
                if net is None or id(net) not in self._chains:
                    continue
                x = torch.zeros(rows, *image_shape, device=self._device_of(net), requires_grad=True)
                with self.autocast():
                    out = self._chains[id(net)].compile_for(self._chain_input(net, x))
                out.float().sum().backward()  # compiles the backward too (AOTAutograd compiles it lazily)

    def _chain_input(self, net: nn.Module, images: Tensor) -> Tensor:
        """What the blocks of ``net`` receive for ``images``, as :meth:`raw_features` makes it."""
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        return net.normalize(x)

    @staticmethod
    def _device_of(net: nn.Module) -> torch.device:
        return next(net.parameters()).device
