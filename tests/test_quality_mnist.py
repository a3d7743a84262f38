"""End-to-end quality on real MNIST (``mnist5k``: 4,000 train / 1,000 test real images, 32x32).

Distilled sets at IPC 1 and IPC 10 must beat random real images of the same count, trained
under the same protocol, by a margin set at about half the gap measured on this 2-core CPU
(figures below). And the gate must not be passable without matching: ``--iterations 0``
returns the initial images, which with factor 1 are the random real subset itself, and
through the very path the distilled set takes (``evaluate_synset``) they must NOT pass.

Scaled down to run in under three minutes on 2 CPU cores (2 min 25 s measured while another
job ran beside it): ConvNet-3 of width 32 (pool and evaluation alike), a pool of 2 x 2 epochs,
factor 1, 100 iterations, 200-epoch evaluation networks. Calibration is off: with a pool this
weak (~87% test accuracy) the cross-entropy step under a pool member cost about 5 points at
IPC 10 (89.5 % with it vs 94.3 % without; factor 2 and 300-epoch evaluation networks, on this
CPU), and the gate is about matching.
"""

import pytest
import torch

from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.distill import Distiller
from ncfm_core.evaluate import EvalConfig, EvalResult, evaluate_images, evaluate_synset, random_real_subset
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.pool import PoolSpec, train_pool

pytestmark = pytest.mark.slow

GATE = dict(factor=1, iterations=100, pool_size=2, pool_epochs=2, real_per_class=32, width=32, calib_weight=0.0,
            seed=0)
PER_IPC = {1: dict(image_lr=0.01), 10: dict(image_lr=0.03)}
# 3 networks at IPC 1; 2 at IPC 10, whose networks cost 10 times as much (the gate must stay near 3 minutes)
EVAL = {ipc: EvalConfig(epochs=200, repeats=repeats, seed=0, width=32) for ipc, repeats in ((1, 3), (10, 2))}
# Measured on this 2-core CPU (final-epoch test accuracy of each evaluation network, and their mean):
#   IPC 1:  distilled 66.6 % (65.7, 67.5, 66.7), random real 43.9 % (44.2, 42.8, 44.7): gap 22.7 points
#   IPC 10: distilled 90.5 % (91.4, 89.5), random real 87.7 % (88.7, 86.8): gap 2.8 points
#   --iterations 0: exactly the random subset's runs at both IPCs (gap 0)
# The margins are about half the measured gaps. Seeded CPU runs repeat these figures exactly; on another
# torch or CPU they move by run-to-run noise (the two IPC 10 networks differ by 1.9 points).
MARGIN = {1: 0.11, 10: 0.014}


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def pool(mnist5k):
    return train_pool(PoolSpec.from_config(make_config("mnist5k", 1, **GATE), mnist5k), mnist5k, "cpu")


@pytest.fixture(scope="module")
def random_results(mnist5k):
    """Random real subsets (seed 0) evaluated once per IPC, shared by the tests below."""
    cache: dict[int, tuple[torch.Tensor, EvalResult]] = {}

    def get(ipc: int) -> tuple[torch.Tensor, EvalResult]:
        if ipc not in cache:
            images, labels = random_real_subset(mnist5k, ipc, seed=0)
            cache[ipc] = images, evaluate_images(images, labels, mnist5k, EVAL[ipc], "cpu")
        return cache[ipc]

    return get


def distill(dataset, pool, ipc: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = decide_precisions(make_config("mnist5k", ipc, **{**GATE, **PER_IPC[ipc], "iterations": iterations}), "cpu")
    distiller = Distiller(config, dataset, pool, "cpu")
    distiller.run(config.iterations)
    return distiller.synthetic_set()


def passes(result: EvalResult, random: EvalResult, ipc: int) -> bool:
    return result.mean >= random.mean + MARGIN[ipc]


def report(name: str, result: EvalResult, random: EvalResult) -> str:
    return f"{name} {result.runs} (mean {result.mean:.3f}), random {random.runs} (mean {random.mean:.3f})"


@pytest.mark.parametrize("ipc", [1, 10])
def test_distilled_mnist_beats_random_real_images(mnist5k, pool, random_results, ipc):
    images, labels = distill(mnist5k, pool, ipc, GATE["iterations"])
    assert images.min() >= 0 and images.max() <= 1
    distilled = evaluate_synset(images, labels, GATE["factor"], mnist5k, EVAL[ipc], "cpu")
    _, random = random_results(ipc)
    print(report(f"IPC {ipc}: distilled", distilled, random))
    assert passes(distilled, random, ipc), report("distilled", distilled, random)


@pytest.mark.parametrize("ipc", [1, 10])
def test_the_gate_fails_without_matching(mnist5k, pool, random_results, ipc):
    images, labels = distill(mnist5k, pool, ipc, 0)
    random_images, random = random_results(ipc)
    # factor 1, init "mix" of one tile: the initial images are the random real subset, pixel for pixel
    assert torch.equal((images * 255).round().to(torch.uint8), random_images)
    if ipc == 1:
        # through the distilled set's own evaluation path they score exactly what the subset scores
        initial = evaluate_synset(images, labels, GATE["factor"], mnist5k, EVAL[ipc], "cpu")
        assert initial.runs == random.runs
    else:
        initial = random  # the same pixels and the same seeded CPU protocol (shown at IPC 1): the same runs
    print(report(f"IPC {ipc}: --iterations 0", initial, random))
    assert not passes(initial, random, ipc), report("--iterations 0", initial, random)
