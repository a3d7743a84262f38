"""Captured fixed-shape work (ncfm_core.graphs): the CUDA-graph contract and the loop through it.

The CPU stand-in enforces what a CUDA graph imposes (static inputs copied in, outputs valid
until the next replay, one capture per shape, nothing in a capture that changes between calls
unseen, no host sync, no random numbers); these tests show it catches each breach, then run the
distillation through it: the same images bit for bit, one capture per shape, psi's second pass
over kept chunks, a resumed run exact. The CUDA implementation's use of the CUDA API is checked
on a simulated one (its numbers need a GPU: ``pytest -m cuda``, run by benchmarks/gpu_check.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ncfm_core import forward, graphs, store
from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.devices import resolve_device
from ncfm_core.distill import Distiller
from ncfm_core.forward import CompileFallbackWarning
from ncfm_core.graphs import CudaGraphs, GraphContract, GraphContractError
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.pool import PoolSpec, train_pool


def double_plus(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (x * 2 + w,)


# ----------------------------------------------------------------------------- the contract


def test_one_capture_per_key_static_inputs_and_outputs_that_the_next_replay_overwrites():
    contract = GraphContract()
    w = torch.ones(3)
    x1, x2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])
    (first,) = contract.forward("k", double_plus, (x1, w))
    assert torch.equal(first, torch.tensor([3.0, 5.0, 7.0]))
    (second,) = contract.forward("k", double_plus, (x2, w))
    assert second is first  # the static output: what a caller kept is overwritten by the replay
    assert torch.equal(first, torch.tensor([11.0, 13.0, 15.0]))
    w.add_(1)  # updated in place at its address: a replay reads the new values
    assert torch.equal(contract.forward("k", double_plus, (x2, w))[0], torch.tensor([12.0, 14.0, 16.0]))
    contract.forward("other", double_plus, (torch.zeros(5), torch.ones(5)))
    assert contract.captures == {"k": 1, "other": 1}
    with pytest.raises(GraphContractError, match="input 0 is \\(4,\\).*captured as \\(3,\\)"):
        contract.forward("k", double_plus, (torch.zeros(4), w))


def test_a_capture_that_reads_what_a_replay_would_not_see_is_refused():
    contract = GraphContract()
    state = {"w": torch.ones(3), "scale": 2.0}

    def region(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * state["scale"] + state["w"],)

    contract.forward("k", region, (torch.ones(3),))
    state["w"] = torch.full((3,), 4.0)  # a new tensor: the capture still reads the old address
    with pytest.raises(GraphContractError, match="a replay would not see what changed"):
        contract.forward("k", region, (torch.ones(3),))
    state["w"] = torch.ones(3)
    contract = GraphContract()
    contract.forward("k", region, (torch.ones(3),))
    state["scale"] = 3.0  # a Python number is baked into the captured kernels
    with pytest.raises(GraphContractError, match="a replay would not see what changed"):
        contract.forward("k", region, (torch.ones(3),))


@pytest.mark.parametrize("breach, message", [
    (lambda x: (x + torch.rand(3),), "draws random numbers"),
    (lambda x: (x * float(x.sum()),), "synchronises with the host"),
    (lambda x: (x[x > 0],), "synchronises with the host"),
    (lambda x: (x + torch.tensor([1.0, 2.0, 3.0]),), "reads host data"),
])
def test_host_syncs_host_data_and_random_numbers_are_refused_inside_a_capture(breach, message):
    with pytest.raises(GraphContractError, match=message):
        GraphContract().forward("k", breach, (torch.ones(3),))


def test_a_differentiable_capture_gives_the_eager_gradients_through_static_buffers():
    contract = GraphContract()
    w = torch.randn(3, generator=torch.Generator().manual_seed(0))

    def region(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.sin() * w).sum(dim=1), labels * 2

    grads = []
    for seed in (1, 2):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        labels = torch.arange(4)
        value, doubled = contract.differentiable("k", region, (x, labels))
        assert torch.equal(doubled, labels * 2) and not doubled.requires_grad
        value.square().sum().backward()
        reference = x.detach().clone().requires_grad_()
        (reference.sin() * w).sum(dim=1).square().sum().backward()
        assert torch.equal(x.grad, reference.grad)
        grads.append(x.grad)
    assert contract.captures == {"k": 1}
    # Two forwards before a backward: the second replay overwrote what the first saved, as on
    # CUDA; the first backward then computes with the second's activations.
    a = torch.full((4, 3), 0.5, requires_grad=True)
    b = torch.full((4, 3), 1.5, requires_grad=True)
    first, _ = contract.differentiable("k", region, (a, torch.arange(4)))
    contract.differentiable("k", region, (b, torch.arange(4)))
    first.sum().backward()
    assert torch.allclose(a.grad, (b.detach().cos() * w).expand(4, 3))


# ----------------------------------------------------------------------------- the loop through it


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    base = decide_precisions(make_config(
        "fake", 2, factor=2, width=8, pool_size=2, pool_epochs=1, pool_batch=16, real_per_class=10, num_freqs=32,
        iterations=6, seed=5, real_chunk=4, class_chunk=2,  # real chunks of 4 and 2, class groups of 2 and 1
    ), "cpu")
    pool = train_pool(PoolSpec.from_config(base, dataset), dataset, "cpu")
    return dataset, base, pool


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sampler", [True, False])
def test_the_loop_through_the_graph_contract_distills_todays_images(tiny, precision, sampler):
    """graphs=on on the CPU runs the contract stand-in: every real chunk (gather, augment with the
    iteration's drawn parameters as inputs, forward) and every class group (decode, augment,
    extractor and teacher forward and backward) captured once per shape over three iterations,
    and the images are today's bit for bit (psi's second pass reads copies of the real chunks,
    which a replay would otherwise overwrite)."""
    dataset, base, pool = tiny
    config = base.replace(precision=precision, sampler=sampler)
    eager = Distiller(config, dataset, pool, "cpu")
    captured = Distiller(config.replace(kernels="graphs=on"), dataset, pool, "cpu")
    assert isinstance(captured.forward.graphs, GraphContract)
    eager.run(3)
    captured.run(3)
    assert torch.equal(captured.images, eager.images)
    captures = captured.forward.graphs.captures
    assert set(captures.values()) == {1}
    real = sorted(key[2] for key in captures if key[0] == "real")
    groups = sorted(key[1] for key in captures if key[0] == "synthetic")
    assert real == [2, 4] and groups == [2, 4]  # rows: real chunks of 2 and 4; stored images of 1 and 2 classes


def test_a_resumed_run_through_the_graphs_is_the_uninterrupted_one(tiny, tmp_path):
    dataset, base, pool = tiny
    config = base.replace(kernels="graphs=on")
    straight = Distiller(config, dataset, pool, "cpu")
    straight.run(4)
    first = Distiller(config, dataset, pool, "cpu")
    first.run(2)
    path = tmp_path / "state.safetensors"
    store.save_state(path, first.state_dict())
    second = Distiller(config, dataset, pool, "cpu")  # captures anew: graphs hold no state of the run
    second.load_state_dict(store.load_state(path))
    second.run(4)
    assert torch.equal(second.images, straight.images)


def test_a_capture_that_fails_leaves_the_run_eager_with_one_warning(tiny, monkeypatch):
    class Refusing(GraphContract):
        def forward(self, key, region, inputs):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(forward, "graphs_for", lambda device_type: Refusing())
    dataset, base, pool = tiny
    eager = Distiller(base, dataset, pool, "cpu")
    captured = Distiller(base.replace(kernels="graphs=on"), dataset, pool, "cpu")
    with pytest.warns(CompileFallbackWarning) as caught:
        captured.run(2)
    assert [str(w.message) for w in caught] == [
        "CUDA graphs could not capture the loop's work, running eagerly: RuntimeError: operation not permitted "
        "when stream is capturing"]
    assert captured.forward.graphs is None
    eager.run(2)
    assert torch.equal(captured.images, eager.images)


def test_running_out_of_memory_in_a_capture_is_not_a_fallback(tiny, monkeypatch):
    """Out of memory is the plan's business (the job reports it, exit 4): it goes up, not eager."""
    class OutOfMemory(GraphContract):
        def forward(self, key, region, inputs):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(forward, "graphs_for", lambda device_type: OutOfMemory())
    dataset, base, pool = tiny
    with pytest.raises(torch.OutOfMemoryError):
        Distiller(base.replace(kernels="graphs=on"), dataset, pool, "cpu").run(1)


# ----------------------------------------------------------------------------- CUDA's API, simulated


class SimulatedGraphApi:
    """The parts of torch.cuda that CudaGraphs calls, on the CPU: a capture records that it
    happened; a replay runs nothing (there are no kernels to replay), so the test sees exactly
    what CudaGraphs does around them. ``made`` holds make_graphed_callables' arguments."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0
        self.made: list[tuple] = []
        self.pool = object()
        api = self

        class Graph:
            def replay(self) -> None:
                api.replays += 1

        self.CUDAGraph = Graph

    def graph_pool_handle(self) -> object:
        return self.pool

    def Stream(self) -> object:  # noqa: N802 - torch's name
        return type("Stream", (), {"wait_stream": lambda self, other: None})()

    def current_stream(self) -> object:
        return self.Stream()

    def stream(self, _stream: object) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def graph(self, graph: object, pool: object = None):
        assert pool is self.pool  # every capture shares the one pool
        self.captures += 1
        yield

    def make_graphed_callables(self, region, sample, num_warmup_iters, pool):
        self.made.append((sample, num_warmup_iters, pool))
        return lambda *inputs: region(*inputs)


@pytest.mark.cuda
def test_cuda_graphs_warm_up_capture_once_and_replay_into_static_buffers(monkeypatch):
    api = SimulatedGraphApi()
    for name in ("graph_pool_handle", "Stream", "current_stream", "stream", "CUDAGraph", "graph",
                 "make_graphed_callables"):
        monkeypatch.setattr(torch.cuda, name, getattr(api, name))
    runs = []

    def region(x: torch.Tensor) -> tuple[torch.Tensor]:
        runs.append(x.clone())
        return (x + 1,)

    cuda = CudaGraphs(warmup=3)
    x1, x2 = torch.tensor([1.0, 2.0]), torch.tensor([7.0, 8.0])
    (out,) = cuda.forward("k", region, (x1,))
    assert len(runs) == 4 and api.captures == 1 and api.replays == 1  # 3 warm-up runs, the capture, a replay
    assert all(r is not x1 for r in runs) and torch.equal(runs[-1], x1)  # it ran on its own static copy
    (again,) = cuda.forward("k", region, (x2,))
    assert again is out and len(runs) == 4 and api.replays == 2  # replayed, not run: no Python
    static = cuda._forward["k"][1][0]
    assert torch.equal(static, x2) and static is not x2  # the call's input copied into the captured buffer
    assert cuda.captures == {"k": 1}
    images = torch.rand(2, 3, requires_grad=True)
    labels = torch.arange(2)
    for _ in range(2):
        cuda.differentiable("g", lambda a, b: (a * 2, b), (images, labels))
    ((sample_images, sample_labels), warmups, pool), = api.made  # made once for the key
    assert sample_images is not images and sample_images.requires_grad and not sample_labels.requires_grad
    assert warmups == 3 and pool is api.pool and cuda.captures["g"] == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_distill_the_eager_images(tiny):
    """On a GPU: the loop with real CUDA graphs against the eager loop, fp32 and bf16."""
    dataset, base, pool = tiny
    device, _ = resolve_device("cuda")
    for precision in ("fp32", "bf16"):
        config = decide_precisions(base.replace(precision=precision, kernels="default"), device)
        eager = Distiller(config, dataset, pool, device)
        captured = Distiller(config.replace(kernels="graphs=on"), dataset, pool, device)
        assert isinstance(captured.forward.graphs, graphs.CudaGraphs)
        eager.run(3)
        captured.run(3)
        torch.testing.assert_close(captured.images, eager.images, rtol=0, atol=1e-5)
