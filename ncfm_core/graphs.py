"""Fixed-shape work captured once per shape and replayed: CUDA graphs behind a small interface.

A captured region is a function of tensors. The first call with a key (its shapes) captures it;
every later call with that key replays the capture. The contract, CUDA's own, which the CPU
stand-in :class:`GraphContract` enforces so that the loop can be tested on a machine without a
GPU:

1. One capture per key: the function runs (after warm-up runs on CUDA) once to be captured;
   later calls do not run its Python code, they replay the kernels it launched.
2. Static inputs: a call's tensors are copied into the buffers the capture read (same shapes,
   dtypes and ``requires_grad``). Anything else the function reads must stay at its address and
   be updated there in place (the networks' weights, which the pool's blend writes in place);
   a Python number that changes between calls would be baked into the capture.
3. Outputs are static buffers, valid until the next replay of the same capture: a caller copies
   what must outlive that. Gradients of a differentiable capture likewise.
4. Nothing inside a capture synchronises with the host (``.item()``, ``nonzero``, data-dependent
   shapes), builds a tensor from host data, or draws random numbers: the iteration's random
   numbers are drawn outside and passed in as inputs.

:class:`CudaGraphs` is the CUDA implementation (``torch.cuda.CUDAGraph`` for no-grad work,
``torch.cuda.make_graphed_callables`` for work with a backward; one memory pool shared by every
capture, which is safe because captures never run concurrently and the loop replays them in the
order it captured them). :func:`graphs_for` picks the implementation for a device type: on a
CPU the stand-in (the same numbers, slower: it runs the function again on every call and checks
it against the capture).
"""

from __future__ import annotations

import collections
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["CudaGraphs", "GraphContract", "GraphContractError", "ShapeGraphs", "graphs_for", "recording"]

Region = Callable[..., tuple[Tensor, ...]]


class GraphContractError(RuntimeError):
    """A captured region broke the CUDA graph contract (see ``ncfm_core.graphs``)."""


class ShapeGraphs(ABC):
    """Captures by key, replayed. ``captures[key]`` counts the captures made for each key (the
    contract allows one)."""

    def __init__(self) -> None:
        self.captures: collections.Counter[Hashable] = collections.Counter()

    @abstractmethod
    def forward(self, key: Hashable, region: Region, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``region(*inputs)`` with no autograd graph (called under no_grad or inference mode):
        captured at the key's first call, replayed after. Returns the static outputs."""

    @abstractmethod
    def differentiable(self, key: Hashable, region: Region, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``region(*inputs)`` whose backward is captured too: gradients flow to the inputs that
        require them through the replayed backward. Returns the static outputs (differentiable)."""


# ----------------------------------------------------------------------------- CUDA


class CudaGraphs(ShapeGraphs):
    """CUDA graphs on the current device: ``warmup`` eager runs on a side stream before each
    capture (cuDNN autotuning, lazy initialisation and compilation must not happen inside one)."""

    def __init__(self, warmup: int = 3) -> None:
        super().__init__()
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self._forward: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], tuple[Tensor, ...]]] = {}
        self._differentiable: dict[Hashable, Callable[..., Any]] = {}

    def forward(self, key: Hashable, region: Region, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        entry = self._forward.get(key)
        if entry is None:
            static = tuple(value.clone() for value in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    region(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = tuple(region(*static))
            entry = self._forward[key] = (graph, static, outputs)
            self.captures[key] += 1
        graph, static, outputs = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return outputs

    def differentiable(self, key: Hashable, region: Region, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        graphed = self._differentiable.get(key)
        if graphed is None:
            sample = tuple(value.detach().clone().requires_grad_(value.requires_grad) for value in inputs)
            graphed = torch.cuda.make_graphed_callables(region, sample, num_warmup_iters=self.warmup, pool=self.pool)
            self._differentiable[key] = graphed
            self.captures[key] += 1
        return tuple(graphed(*inputs))


# ----------------------------------------------------------------------------- the CPU stand-in

_HOST_SYNCS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                         "unique_consecutive", "equal", "is_nonzero", "lift_fresh", "lift_fresh_copy"})
_RANDOM_WITHOUT_GENERATOR = frozenset({"native_dropout", "rrelu_with_noise", "_fused_dropout"})
_MASKABLE = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # a boolean index: nonzero inside


def _has_mask(args: tuple) -> bool:
    return any(isinstance(t, Tensor) and t.dtype in (torch.bool, torch.uint8) for t in tree_leaves(args[1:]))


@functools.lru_cache(maxsize=None)
def _draws_random_numbers(packet: Any) -> bool:
    """Whether an aten op draws random numbers: one of its overloads takes a generator
    (``rand`` has ``rand.generator``), or it is one that draws from the default generator
    without ever naming it."""
    if packet.__name__ in _RANDOM_WITHOUT_GENERATOR:
        return True
    overloads = (getattr(packet, name) for name in packet.overloads())
    return any("Generator" in str(argument.type) for op in overloads for argument in op._schema.arguments)


def _is_random(func: Any) -> bool:
    return _draws_random_numbers(func.overloadpacket)


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Records every aten op a region runs: its name, its non-tensor arguments and the storages
    it reads that the region did not make (the external ones); refuses host syncs, host data and
    random numbers. What the region makes is kept alive while the recorder is (``made``), so
    that no storage it made is freed and its address given to another tensor meanwhile."""

    def __init__(self, what: str, inside: _Recorder | None = None) -> None:
        super().__init__()
        self.what = what
        self.ops: list[tuple[str, str, tuple[int, ...]]] = []
        # storages made inside the region (a backward's include its forward's, i.e. its saved tensors)
        self.produced: set[int] = set() if inside is None else set(inside.produced)
        self.made: list[Tensor] = [] if inside is None else list(inside.made)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _HOST_SYNCS or (name in _MASKABLE and _has_mask(args)):
            raise GraphContractError(f"{self.what}: {func} synchronises with the host or reads host data inside a "
                                     "captured region")
        if _is_random(func):
            raise GraphContractError(f"{self.what}: {func} draws random numbers inside a captured region; draw them "
                                     "outside and pass them in as inputs")
        leaves = tree_leaves((args, kwargs))
        external = tuple(_storage(t) for t in leaves if isinstance(t, Tensor) and _storage(t) not in self.produced)
        constants = repr([leaf for leaf in leaves if not isinstance(leaf, Tensor)])
        out = func(*args, **kwargs)
        made = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        self.made += made
        self.produced.update(_storage(t) for t in made)
        self.ops.append((str(func), constants, external))
        return out


@dataclass
class _Capture:
    """One key's capture in the stand-in: its static inputs and outputs and what it ran."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...] = ()
    ops: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    backward_ops: list[tuple[str, str, tuple[int, ...]]] | None = None
    grad_outputs: tuple[Tensor | None, ...] = ()
    grad_inputs: tuple[Tensor | None, ...] = ()
    live: tuple[Tensor, ...] = ()  # the latest forward's outputs, with their autograd graph
    forward_recorder: _Recorder | None = None  # what the latest forward made (its saved tensors among it)


class GraphContract(ShapeGraphs):
    """The CPU stand-in for :class:`CudaGraphs`: it computes by running the region again on
    every call, and enforces the contract a CUDA graph imposes (module docstring): one capture per
    key; a call's inputs must have the captured shapes, dtypes and ``requires_grad`` and are
    copied into the static buffers, which are all the region gets; every call must run the
    captured op sequence with the same non-tensor arguments and read the same external storages
    (what a replay would read); no host sync, host data or random numbers inside; outputs (and
    gradients) are written into the capture's static buffers and returned as aliases of them, so
    a caller that keeps one past the next call sees it overwritten, as on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[Hashable, _Capture] = {}

    def _inputs(self, key: Hashable, inputs: Sequence[Tensor], grad: bool) -> tuple[_Capture, bool]:
        entry = self._entries.get(key)
        if entry is None:
            static = tuple(value.detach().clone().requires_grad_(grad and value.requires_grad) for value in inputs)
            entry = self._entries[key] = _Capture(static)
            self.captures[key] += 1
            return entry, True
        if len(inputs) != len(entry.inputs):
            raise GraphContractError(f"graph {key!r}: {len(inputs)} inputs, captured with {len(entry.inputs)}")
        for index, (buffer, value) in enumerate(zip(entry.inputs, inputs)):
            if (value.shape, value.dtype, value.device) != (buffer.shape, buffer.dtype, buffer.device) or (
                    grad and value.requires_grad != buffer.requires_grad):
                raise GraphContractError(f"graph {key!r}: input {index} is {tuple(value.shape)} {value.dtype}, "
                                         f"captured as {tuple(buffer.shape)} {buffer.dtype}; a replay copies into "
                                         "the captured buffers")
        with torch.no_grad():
            for buffer, value in zip(entry.inputs, inputs):
                buffer.copy_(value)
        return entry, False

    @staticmethod
    def _check(key: Hashable, captured: list, ran: list, what: str) -> None:
        if ran != captured:
            first = next((i for i, (a, b) in enumerate(zip(captured, ran)) if a != b), min(len(captured), len(ran)))
            seen = ran[first] if first < len(ran) else "nothing"
            expected = captured[first] if first < len(captured) else "nothing"
            raise GraphContractError(f"graph {key!r}: the {what} ran {seen} where the capture ran {expected} "
                                     f"(op {first}): a replay would not see what changed")

    def forward(self, key: Hashable, region: Region, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        entry, first = self._inputs(key, inputs, grad=False)
        recorder = _Recorder(f"graph {key!r}")
        with recorder:
            outputs = tuple(region(*entry.inputs))
        if first:
            entry.ops, entry.outputs = recorder.ops, outputs
            return outputs
        self._check(key, entry.ops, recorder.ops, "forward")
        for buffer, value in zip(entry.outputs, outputs):
            buffer.copy_(value)
        return entry.outputs

    def differentiable(self, key: Hashable, region: Region, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        entry, first = self._inputs(key, inputs, grad=True)
        return _StandInReplay.apply(self, key, entry, region, first, *inputs)


class _StandInReplay(torch.autograd.Function):
    """The stand-in's differentiable replay: forward and backward run on the capture's static
    buffers and return aliases of them."""

    @staticmethod
    def forward(ctx: Any, contract: GraphContract, key: Hashable, entry: _Capture, region: Region, first: bool,
                *inputs: Tensor) -> tuple[Tensor, ...]:
        recorder = _Recorder(f"graph {key!r}")
        with torch.enable_grad(), recorder:
            live = tuple(region(*entry.inputs))
        if first:
            entry.ops = recorder.ops
            entry.outputs = tuple(value.detach().clone() for value in live)
            entry.grad_outputs = tuple(torch.empty_like(v) if v.requires_grad else None for v in live)
        else:
            contract._check(key, entry.ops, recorder.ops, "forward")
            with torch.no_grad():
                for buffer, value in zip(entry.outputs, live):
                    buffer.copy_(value)
        # a second forward before this one's backward replaces both, as a replay overwrites the
        # activations a captured forward saved for its backward
        entry.live, entry.forward_recorder = live, recorder
        ctx.contract, ctx.key, ctx.entry = contract, key, entry
        returned = tuple(buffer.detach() for buffer in entry.outputs)
        ctx.mark_non_differentiable(*(value for value in returned if not value.is_floating_point()))
        return returned

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        entry: _Capture = ctx.entry
        with torch.no_grad():
            for buffer, grad in zip(entry.grad_outputs, grads):
                if buffer is not None:
                    buffer.copy_(grad)
        wanted = [value for value in entry.live if value.requires_grad]
        targets = [buffer for buffer in entry.inputs if buffer.requires_grad]
        recorder = _Recorder(f"graph {ctx.key!r}", inside=entry.forward_recorder)  # saved tensors: inside
        with recorder:
            computed = torch.autograd.grad(wanted, targets, [g for g in entry.grad_outputs if g is not None],
                                           allow_unused=True)
        if entry.backward_ops is None:
            entry.backward_ops = recorder.ops
            entry.grad_inputs = tuple(None if g is None else g.clone() for g in computed)
        else:
            ctx.contract._check(ctx.key, entry.backward_ops, recorder.ops, "backward")
            for buffer, grad in zip(entry.grad_inputs, computed):
                if buffer is not None:
                    buffer.copy_(grad)
        per_input = iter(entry.grad_inputs)
        grads_in = [next(per_input) if buffer.requires_grad else None for buffer in entry.inputs]
        return (None, None, None, None, None, *(None if g is None else g.detach() for g in grads_in))


def recording() -> bool:
    """Whether the stand-in is recording a region on this thread. torch.compile cannot run
    under its recorder (a dispatch mode): compiled code asks this and runs eagerly meanwhile, so
    the stand-in checks the region's eager ops (on CUDA a capture records the compiled kernels)."""
    return any(isinstance(mode, _Recorder) for mode in _dispatch_modes())


def _dispatch_modes() -> list[TorchDispatchMode]:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return list(_get_current_dispatch_mode_stack())


def graphs_for(device_type: str) -> ShapeGraphs:
    """The graphs of a device type: :class:`CudaGraphs` on CUDA, elsewhere the stand-in that
    enforces their contract (:class:`GraphContract`)."""
    return CudaGraphs() if device_type == "cuda" else GraphContract()
