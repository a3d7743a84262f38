"""How the loop runs its networks (ncfm_core.forward): the compile lever.

The compiled blocks against the eager ones (a whole distillation through torch.compile, and
inductor's own code on the CPU), compilation before the first iteration and never inside the
loop, the fallback to eager with one warning when the compiler fails (while compiling or when
its code first runs), no compiled blocks with checkpointing, and the compile time recorded apart
from the seconds per iteration.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ncfm_core import forward
from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.distill import Distiller
from ncfm_core.forward import CompileFallbackWarning, LoopForward
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.kernels import KernelLevers
from ncfm_core.models import create_network
from ncfm_core.pool import PoolSpec, train_pool


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    base = decide_precisions(make_config(
        "fake", 2, factor=2, width=8, pool_size=2, pool_epochs=1, pool_batch=16, real_per_class=10, num_freqs=32,
        iterations=6, seed=5, real_chunk=4,  # a class of 10 in chunks of 4, 4 and 2: two real shapes
    ), "cpu")
    pool = train_pool(PoolSpec.from_config(base, dataset), dataset, "cpu")
    return dataset, base, pool


class CountingBackend:
    """A torch.compile backend that runs dynamo's graphs as they are (no code generated) and
    counts how many it compiled and how often they ran."""

    def __init__(self) -> None:
        self.compiled = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1

        def run(*args: object) -> object:
            self.calls += 1
            return graph(*args)

        return run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_compiled_run_is_the_eager_run_and_compiles_only_before_the_loop(tiny, monkeypatch, precision):
    """compile=on: the blocks of the extractor and the teacher compiled for the plan's shapes
    (two real chunk shapes, no grad; one class group shape, with the backward) when the
    distiller is built, then run compiled in every chunk, and nothing compiles inside the loop.
    With dynamo's graphs run as traced the images are today's bit for bit (fp32 and bf16)."""
    dataset, base, pool = tiny
    backend = CountingBackend()
    monkeypatch.setattr(forward, "COMPILE_BACKEND", backend)
    config = base.replace(precision=precision, class_chunk=3)
    eager = Distiller(config, dataset, pool, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        compiled = Distiller(config.replace(kernels="compile=on"), dataset, pool, "cpu")
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert any("compiled the networks' blocks" in note and "not in the seconds per iteration" in note
               for note in compiled.notes)
    graphs, warm_calls = backend.compiled, backend.calls
    assert graphs >= 3  # real chunks of 4 and of 2 (no grad), the class group (extractor and teacher)
    eager.run(3)
    compiled.run(3)
    assert backend.compiled == graphs  # nothing compiled inside the loop
    real_chunks = len(compiled._real_bounds)  # no-grad forwards of the extractor
    assert backend.calls - warm_calls == 3 * (real_chunks + 2)  # + the group's extractor and teacher
    assert torch.equal(compiled.images, eager.images)


def test_inductor_compiled_blocks_compute_the_eager_features_and_gradients():
    """inductor's generated code (C++ on the CPU; Triton on CUDA) for a ConvNet's blocks: the
    features and the images' gradient within 1e-5 of the eager ones (measured 3e-7: fused kernels
    sum in another order), and the compile time measured."""
    torch.manual_seed(0)
    net = create_network("convnet", in_channels=1, num_classes=3, image_size=8, depth=2, width=8)
    net = net.requires_grad_(False).eval()
    loop = LoopForward([net], device_type="cpu", precision="fp32", checkpointing=False,
                       levers=KernelLevers(compile="on"), normalize=True)
    seconds = loop.compile_blocks(net, None, (1, 8, 8), [6], [8], torch.inference_mode)
    assert seconds is not None and seconds > 0 and loop.compile_seconds == seconds
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(loop.raw_features(net, x, grad=False), net.features(x), rtol=0, atol=1e-5)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in (lambda t: loop.raw_features(net, t, grad=True), net.features):
        leaf = images.clone().requires_grad_()
        run(leaf).sin().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_a_compiler_that_fails_leaves_the_run_eager_with_one_warning(tiny, monkeypatch):
    dataset, base, pool = tiny

    def broken_compile(module, **kwargs):
        def run(x):
            raise RuntimeError("no compiler here\nsecond line of its report")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = Distiller(base, dataset, pool, "cpu")
    with pytest.warns(CompileFallbackWarning) as caught:
        compiled = Distiller(base.replace(kernels="compile=on"), dataset, pool, "cpu")
        compiled.run(2)
    assert [str(w.message) for w in caught] == ["torch.compile failed, running eagerly: RuntimeError: no compiler here"]
    assert compiled.compile_seconds is None
    eager.run(2)
    assert torch.equal(compiled.images, eager.images)


def test_compiled_code_that_fails_in_the_loop_leaves_it_eager_with_one_warning(tiny, monkeypatch):
    dataset, base, pool = tiny
    backend = CountingBackend()

    def failing_later(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        run = backend(graph, example_inputs)

        def maybe(*args: object) -> object:
            if backend.calls >= 6:  # past the compile's own runs: inside the loop
                raise RuntimeError("a kernel failed")
            return run(*args)

        return maybe

    monkeypatch.setattr(forward, "COMPILE_BACKEND", failing_later)
    eager = Distiller(base, dataset, pool, "cpu")
    compiled = Distiller(base.replace(kernels="compile=on"), dataset, pool, "cpu")
    with pytest.warns(CompileFallbackWarning) as caught:
        compiled.run(2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(compiled.forward._chains) and all(
        m == "compiled blocks failed, running eagerly: RuntimeError: a kernel failed" for m in messages)
    eager.run(2)
    assert torch.equal(compiled.images, eager.images)


def test_checkpointing_plans_run_the_blocks_eagerly_and_say_so(tiny):
    """Recomputed blocks run under autograd's hooks: the plan turns compile (and graphs) off
    with checkpointing, and the loop would not compile them anyway."""
    from ncfm_core.data import DatasetShape
    from ncfm_core.planner import plan_run

    dataset, base, pool = tiny
    config = base.replace(kernels="compile=on,graphs=on,norm=batchnorm", activation_checkpointing=True)
    plan = plan_run(config, DatasetShape.of(dataset), "cpu", None)
    assert plan.activation_checkpointing and plan.kernels == KernelLevers(norm="batchnorm")
    assert plan.apply(config).kernels == KernelLevers(norm="batchnorm").spec()
    distiller = Distiller(config, dataset, pool, "cpu")  # a config that still asks: the loop says no too
    assert distiller.compile_seconds is None and not distiller.forward._chains and distiller.forward.graphs is None


def test_the_job_records_the_levers_and_the_compile_time_apart(tmp_path, monkeypatch):
    """``ncfm distill --compile`` on the CPU: the plan and the manifest record the levers, the
    session its compile seconds (in its total time, not in its seconds per iteration), the
    dry run shows the levers and ``ncfm inspect`` both."""
    from cli_runner import TINY, invoke, one_json, one_thread

    from ncfm_core.store import Store

    monkeypatch.setattr(forward, "COMPILE_BACKEND", "aot_eager")
    store = tmp_path / "store"
    args = ["distill", "digits", "--ipc", "1", "--iterations", "3", *TINY, "--compile"]
    planned = one_json(invoke("--store", store, "--json", *args, "--dry-run"))
    assert KernelLevers.from_dict(planned["plan"]["kernels"]) == KernelLevers(compile="on")
    assert planned["config"]["kernels"] == KernelLevers(compile="on").spec()
    assert "compile=on" in invoke("--store", store, *args, "--dry-run").stdout
    with one_thread():
        made = one_json(invoke("--store", store, "--json", *args))
    record = Store(store).resolve(made["artifact"]).record()
    assert KernelLevers.from_dict(dict(record.plan.kernels)) == KernelLevers(compile="on")
    assert record.config["kernels"] == KernelLevers(compile="on").spec()
    (session,) = record.timings.per_session
    assert 0 < session.compile_seconds < session.seconds
    shown = invoke("--store", store, "inspect", made["artifact"]).stdout
    assert "kernel levers" in shown and "compile=on" in shown and "compiling" in shown
