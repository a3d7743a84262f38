"""Feature-extractor pool: P networks trained on the real data, kept in memory.

For each member we keep its initial and its trained weights. Every distillation iteration
picks a member and ``beta ~ U(0, 1)`` and writes ``beta * init + (1 - beta) * trained`` into
one reusable module (the authors reload both checkpoints from disk every iteration; we never
touch the disk inside the loop). The pool round-trips through safetensors so later runs on the
same dataset reuse it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ncfm_core import store
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset
from ncfm_core.errors import CorruptArtifactError
from ncfm_core.models import create_network, default_depth, supported_options
from ncfm_core.store.layout import POOL_FORMAT, POOL_FORMAT_VERSION
from ncfm_core.train import TrainSettings, accuracy, train_classifier



@dataclass(frozen=True)
class PoolSpec:
    """What determines a pool: the network and how its members were trained."""

    dataset_fingerprint: str
    network: str
    depth: int
    width: int
    norm: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch: int
    seed: int
    dsa_strategy: str

    @classmethod
    def from_config(cls, config: DistillConfig, dataset: ImageDataset) -> PoolSpec:
        return cls(
            dataset_fingerprint=dataset.fingerprint,
            network=config.network,
            depth=config.depth or default_depth(dataset.image_size),
            width=config.width,
            norm=config.norm,
            in_channels=dataset.channels,
            num_classes=dataset.num_classes,
            image_size=dataset.image_size,
            mean=tuple(dataset.mean),
            std=tuple(dataset.std),
            size=config.pool_size,
            epochs=config.pool_epochs,
            lr=config.pool_lr,
            momentum=config.pool_momentum,
            weight_decay=config.pool_weight_decay,
            batch=config.pool_batch,
            seed=config.seed,
            dsa_strategy=config.dsa_strategy,
        )

    def key(self) -> str:
        """A stable content hash: the cache key of this pool in the store."""
        blob = json.dumps({**self.__dict__, "format": POOL_FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def build(self) -> nn.Module:
        """A fresh (randomly initialised, CPU) network of the members' shape."""
        # Each network gets the knobs it has (ConvNet-3: width and norm; AlexNet: none).
        shape = supported_options(self.network, depth=self.depth, width=self.width, norm=self.norm)
        return create_network(
            self.network,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            **shape,
        )


@dataclass
class Pool:
    """Initial and trained weights of every member, as lists of state dicts."""

    spec: PoolSpec
    init_states: list[dict[str, Tensor]]
    trained_states: list[dict[str, Tensor]]
    test_accuracy: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trained_states)

    def to(self, device: torch.device | str) -> Pool:
        move = lambda states: [{k: v.to(device) for k, v in s.items()} for s in states]  # noqa: E731
        return Pool(self.spec, move(self.init_states), move(self.trained_states), list(self.test_accuracy))

    @torch.no_grad()
    def blend_into(self, module: nn.Module, member: int, beta: float) -> None:
        """Write ``beta * init + (1 - beta) * trained`` of ``member`` into ``module`` in place.

        A weight ``module`` holds in low precision (the casts=once kernel lever,
        ``kernels.cast_weights_once``) receives the fp32 blend rounded once, in the same kernel:
        the cast autocast would otherwise make on every call, made once per iteration."""
        init, trained = self.init_states[member], self.trained_states[member]
        for name, target in module.state_dict().items():
            if target.is_floating_point():
                torch.lerp(init[name], trained[name], 1.0 - beta, out=target)
            else:
                target.copy_(trained[name])

    @torch.no_grad()
    def load_trained_into(self, module: nn.Module, member: int) -> None:
        module.load_state_dict(self.trained_states[member])

    # -- persistence (safetensors + JSON metadata, no pickle) ---------------------------------
    def save(self, path: Path) -> None:
        tensors = {}
        for i, (init, trained) in enumerate(zip(self.init_states, self.trained_states)):
            tensors.update({f"m{i}.init.{k}": v for k, v in init.items()})
            tensors.update({f"m{i}.trained.{k}": v for k, v in trained.items()})
        meta = {
            "format": POOL_FORMAT,
            "spec": json.dumps(self.spec.__dict__, sort_keys=True),
            "test_accuracy": json.dumps(self.test_accuracy),
        }
        store.save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Path, spec: PoolSpec, device: torch.device | str = "cpu") -> Pool:
        """Load a pool saved by :meth:`save`; the file must match ``spec`` exactly."""
        reference = spec.build().state_dict()
        expected = {}
        for i in range(spec.size):
            for kind in ("init", "trained"):
                expected.update(
                    {f"m{i}.{kind}.{k}": (tuple(v.shape), v.dtype) for k, v in reference.items()}
                )
        tensors, meta = store.load_tensors(path, expected, device=str(device))
        try:  # metadata is not covered by the tensors' digest: anything may be there
            stored_spec, accuracy = json.loads(meta.get("spec", "{}")), json.loads(meta.get("test_accuracy", "[]"))
        except (ValueError, RecursionError):
            stored_spec, accuracy = None, None
        if meta.get("format") != POOL_FORMAT or stored_spec != json.loads(
            json.dumps(spec.__dict__, sort_keys=True)
        ) or not (isinstance(accuracy, list) and len(accuracy) == spec.size
                  and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in accuracy)):
            raise CorruptArtifactError(f"{path}: not a pool for this dataset and network; delete it to retrain")
        init = [{k: tensors[f"m{i}.init.{k}"] for k in reference} for i in range(spec.size)]
        trained = [{k: tensors[f"m{i}.trained.{k}"] for k in reference} for i in range(spec.size)]
        return cls(spec, init, trained, accuracy)


PoolProgress = Callable[[int, int, float], None]  # (member, epoch, loss)


def train_pool(
    spec: PoolSpec,
    dataset: ImageDataset,
    device: torch.device | str,
    on_progress: PoolProgress | None = None,
    members: Sequence[int] | None = None,
) -> Pool:
    """Train ``spec.size`` networks from scratch on the real training set (SGD as the authors).

    Member ``i`` uses its own seed derived from ``spec.seed``, so members differ and the pool is
    reproducible. Images stay on ``device`` as uint8. ``members`` (default all) trains only those
    members, in that order (one process's share in ``ncfm_core.parallel``).
    """
    images = dataset.train_images.to(device)
    labels = dataset.train_labels.to(device)
    test_images = dataset.test_images.to(device)
    test_labels = dataset.test_labels.to(device)
    settings = TrainSettings(
        epochs=spec.epochs,
        lr=spec.lr,
        optimizer="sgd",
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        batch_size=spec.batch,
        schedule="none",
        dsa_strategy=spec.dsa_strategy,
        allow_flip=dataset.allow_flip,
    )
    init_states, trained_states, accuracies = [], [], []
    for member in range(spec.size) if members is None else members:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed * 1000 + member)  # this member's weight init; global RNG restored
            net = spec.build().to(device)
        init_states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        generator = torch.Generator(device=device).manual_seed(spec.seed * 1000 + member)
        callback = None if on_progress is None else (lambda e, loss, m=member: on_progress(m, e, loss))
        train_classifier(net, images, labels, settings, generator, on_epoch=callback)
        trained_states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        accuracies.append(accuracy(net, test_images, test_labels))
    return Pool(spec, init_states, trained_states, accuracies)


def load_or_train_pool(
    spec: PoolSpec,
    dataset: ImageDataset,
    device: torch.device | str,
    cache_dir: Path | None = None,
    on_progress: PoolProgress | None = None,
) -> tuple[Pool, bool]:
    """Reuse the pool cached under ``cache_dir`` if there is one, else train and cache it.

    Returns (pool on ``device``, whether it came from the cache).
    """
    path = None if cache_dir is None else Path(cache_dir) / store.POOL_FILE
    if path is not None and path.exists():
        return Pool.load(path, spec, device=device), True
    pool = train_pool(spec, dataset, device, on_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pool.to("cpu").save(path)
    return pool, False

