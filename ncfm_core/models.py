"""Networks behind a timm-style registry: the ConvNet-D feature extractor and the
cross-architecture evaluation nets (AlexNet, VGG-11, ResNet-18) in the variants that the
dataset-distillation papers (DC, DSA, DM, MTT, NCFM) use.

Every network takes images in ``[0, 1]`` of shape ``(B, C, H, W)`` and normalises them
with the dataset mean/std as its first step, so callers (the augmentation, the synthetic
set, the store) all work in pixel space. ``features(x)`` is the flattened input of the
final classifier, shape ``(B, feature_dim)``; ``forward(x)`` returns logits
``(B, num_classes)``.

Weights use PyTorch's default initialisation, as the DC/DSA/DM/MTT/NCFM code does.
Networks without BatchNorm are pure functions of their parameters and buffers, so
``torch.func.stack_module_state`` + ``functional_call`` + ``vmap`` can run several copies
at once.

Which kernels compute the 2x2 average pools and the instance norms is a choice of
:class:`ncfm_core.kernels.KernelLevers` (``create_network(..., levers=)``, or
:func:`ncfm_core.kernels.apply_levers` on a built network): the same function and the same
state dict whichever is chosen; the default is the plain ``nn.AvgPool2d`` / ``nn.GroupNorm``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncfm_core.errors import ConfigError
from ncfm_core.kernels import KernelLevers, apply_levers

__all__ = [
    "AlexNet",
    "ConvNet",
    "ImageClassifier",
    "ResNet18",
    "VGG11",
    "create_network",
    "default_depth",
    "network_names",
    "network_options",
    "register_network",
    "supported_options",
]

NetworkFactory = Callable[..., "ImageClassifier"]

_NETWORKS: dict[str, NetworkFactory] = {}

NORMS = ("instance", "batch", "none")
POOLINGS = ("avg", "max", "none")


def register_network(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator that files a factory under ``name`` (lower case) in the registry.

    The factory is called as ``factory(in_channels=, num_classes=, image_size=, mean=,
    std=, **options)`` and returns an :class:`ImageClassifier`.
    """
    key = name.lower()

    def add(factory: NetworkFactory) -> NetworkFactory:
        if key in _NETWORKS:
            raise ValueError(f"network {key!r} is registered twice")
        _NETWORKS[key] = factory
        return factory

    return add


def network_names() -> list[str]:
    """Sorted names of every registered network."""
    return sorted(_NETWORKS)


def network_options(name: str) -> frozenset[str]:
    """The options registered network ``name`` takes besides the data's shape and statistics
    (e.g. ``{"depth", "width", "norm", "pooling"}`` for ConvNet, none for AlexNet)."""
    factory = _NETWORKS.get(name.strip().lower())
    if factory is None:
        return frozenset()
    return frozenset(
        p.name for p in inspect.signature(factory).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ) - {"in_channels", "num_classes", "image_size", "mean", "std"}


def supported_options(name: str, **candidates: object) -> dict[str, object]:
    """The ``candidates`` (e.g. a config's depth, width, norm) that network ``name`` takes: a
    ConvNet gets all three, ConvNet-3 its width and norm (its depth is fixed), AlexNet none."""
    accepted = network_options(name)
    return {option: value for option, value in candidates.items() if option in accepted}


def default_depth(image_size: int) -> int:
    """ConvNet depth for square images of side ``image_size``: 16->2, 32->3, 64->4,
    128->5, i.e. ``floor(log2(size)) - 2``, at least 1 (the feature map ends at 4x4)."""
    if image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}")
    return max(1, image_size.bit_length() - 1 - 2)


def create_network(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    levers: KernelLevers | None = None,
    **kwargs,
) -> ImageClassifier:
    """Build a registered network.

    ``mean``/``std`` are per-channel statistics of ``[0, 1]`` images (length
    ``in_channels``); ``None`` means 0.5 for every channel. ``levers`` picks the kernels of
    its 2x2 average pools and instance norms (None: the defaults); they change neither the
    function nor the state dict. Extra keyword arguments are the network's own options (e.g.
    ``depth``, ``width``, ``norm`` for ConvNet). Unknown names or options raise
    :class:`ConfigError`.
    """
    key = name.strip().lower()
    factory = _NETWORKS.get(key)
    if factory is None:
        close = difflib.get_close_matches(key, network_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown network {name!r}; {hint}choose one of: {', '.join(network_names())}"
        )
    if in_channels < 1 or num_classes < 1 or image_size < 1:
        raise ConfigError(
            f"network {key!r} needs positive in_channels, num_classes and image_size, got "
            f"{in_channels}, {num_classes}, {image_size}"
        )
    accepted = network_options(key)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(
            f"network {key!r} has no option(s) {', '.join(unknown)}; its options are: {valid}"
        )
    mean = _channel_stat(mean, in_channels, "mean", default=0.5)
    std = _channel_stat(std, in_channels, "std", default=0.5)
    if any(s <= 0 for s in std):
        raise ConfigError(f"std must be positive for every channel, got {std}")
    net = factory(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        mean=mean,
        std=std,
        **kwargs,
    )
    return net if levers is None else apply_levers(net, levers)


def _channel_stat(
    values: Sequence[float] | None, in_channels: int, what: str, default: float
) -> list[float]:
    if values is None:
        return [default] * in_channels
    values = [float(v) for v in values]
    if len(values) != in_channels:
        raise ConfigError(
            f"{what} has {len(values)} values but the images have {in_channels} channels; "
            f"give one value per channel"
        )
    return values


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm as the DD papers write it: one group per channel, affine. Unlike
    ``nn.InstanceNorm2d`` it has no running statistics, so train and eval agree."""
    return nn.GroupNorm(channels, channels, affine=True)


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"instance"`` -> GroupNorm(c, c); ``"batch"`` -> BatchNorm2d; ``"none"`` -> Identity."""
    if norm == "instance":
        return instance_norm(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


class ImageClassifier(nn.Module):
    """Base class: normalise ``[0, 1]`` images, embed them, classify with ``classifier``.

    Subclasses set ``self.classifier`` and ``self.feature_dim`` and implement
    ``embed(normalized) -> (B, feature_dim)``.
    """

    feature_dim: int
    classifier: nn.Module

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Buffers (not constants) so they follow .to(device/dtype), live in the
        # state dict, and get stacked by torch.func.stack_module_state.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` in ``[0, 1]`` -> ``(images - mean) / std``, same shape."""
        return (images - self.mean) / self.std

    def embed(self, normalized: Tensor) -> Tensor:
        """Normalised images ``(B, C, H, W)`` -> flattened features ``(B, feature_dim)``."""
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images ``(B, C, H, W)`` -> classifier inputs ``(B, feature_dim)``."""
        return self.embed(self.normalize(images))

    def forward(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.classifier(self.features(images))


class ConvBlock(nn.Module):
    """Conv3x3(pad 1) -> norm -> ReLU -> 2x2 pooling (or none)."""

    def __init__(self, in_channels: int, width: int, norm: str, pooling: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.norm = make_norm(norm, width)
        if pooling == "avg":
            self.pool: nn.Module = nn.AvgPool2d(kernel_size=2, stride=2)
        elif pooling == "max":
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.pool = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class ConvNet(ImageClassifier):
    """ConvNet-D of DC/DSA/DM/MTT/NCFM: ``depth`` x [Conv3x3 -> norm -> ReLU -> AvgPool2d(2)]
    then one Linear on the flattened map. Features: ``width * (H / 2^depth)^2`` dims
    (ConvNet-3 on 32x32: 128*4*4 = 2048).

    Unlike the papers' code, the first conv always pads by 1 (theirs pads 3 for
    one-channel 28x28 inputs to mimic 32x32), so the feature size depends only on
    ``image_size`` and ``depth``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        depth: int,
        width: int = 128,
        norm: str = "instance",
        pooling: str = "avg",
    ) -> None:
        super().__init__(mean, std)
        if norm not in NORMS:
            raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if depth < 1 or width < 1:
            raise ConfigError(f"ConvNet depth and width must be positive, got {depth}, {width}")
        side = image_size
        if pooling != "none":
            for _ in range(depth):
                side //= 2
            if side < 1:
                raise ConfigError(
                    f"ConvNet of depth {depth} needs images of at least {2 ** depth} pixels, "
                    f"got {image_size}; use a smaller depth"
                )
        self.depth = depth
        self.width = width
        self.blocks = nn.Sequential(
            *(ConvBlock(in_channels if d == 0 else width, width, norm, pooling) for d in range(depth))
        )
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, normalized: Tensor) -> Tensor:
        return self.blocks(normalized).flatten(1)  # (B, width * side * side)


class AlexNet(ImageClassifier):
    """The small AlexNet of DC's ``networks.py`` (no normalisation layers, ReLU +
    MaxPool): conv5x5 128 -> pool -> conv5x5 192 -> pool -> conv3x3 256 -> conv3x3 192 ->
    conv3x3 192 -> pool -> Linear. On 32x32 the classifier sees 192*4*4 = 3072 features;
    for other sizes the flattened size is ``192 * (H // 8)^2`` (needs H >= 8). DC pads
    the first conv by 4 for one-channel 28x28 images; here it always pads by 2.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(mean, std)
        side = image_size // 2 // 2 // 2
        if side < 1:
            raise ConfigError(f"AlexNet needs images of at least 8 pixels, got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 128, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.feature_dim = 192 * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, normalized: Tensor) -> Tensor:
        return self.body(normalized).flatten(1)  # (B, 192 * side * side)


VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(ImageClassifier):
    """VGG-11 for small images as in DC/MTT: conv3x3 -> norm -> ReLU blocks with the
    layout ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]`` and instance norm
    (GroupNorm(c, c)) by default, then Linear(512, classes).

    On 32x32 the five max-pools end at 1x1, exactly as in DC/MTT. For other sizes: a
    max-pool that would leave a map smaller than 2x2 for the convolutions after it is
    left out (instance norm over a 1x1 map outputs its bias whatever the input), the
    last max-pool is kept while the map is at least 2x2, and an adaptive average pool to
    1x1 before the classifier makes the feature size 512 for any size >= 2 (16x16: convs
    at 16, 8, 4, 2, 2, then the last max-pool to 1x1).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        norm: str = "instance",
    ) -> None:
        super().__init__(mean, std)
        layers: list[nn.Module] = []
        if image_size < 2:
            raise ConfigError(f"VGG-11 needs images of at least 2 pixels, got {image_size}")
        channels, side = in_channels, image_size
        last_pool = len(VGG11_LAYOUT) - 1 - VGG11_LAYOUT[::-1].index("M")
        for position, item in enumerate(VGG11_LAYOUT):
            if item == "M":
                smallest_kept = 1 if position == last_pool else 2
                if side // 2 >= smallest_kept:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    side //= 2
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), make_norm(norm, item), nn.ReLU()]
                channels = item
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.body = nn.Sequential(*layers)
        self.feature_dim = channels
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, normalized: Tensor) -> Tensor:
        return self.body(normalized).flatten(1)  # (B, 512)


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3 (no bias) with norm, identity or 1x1 projection
    shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(ImageClassifier):
    """ResNet-18 for small images as in DC/MTT: 3x3 stem (stride 1, no max-pool),
    BasicBlocks [2, 2, 2, 2] with widths 64/128/256/512 and strides 1/2/2/2, instance
    norm (GroupNorm(c, c)) by default, adaptive average pool to 1x1, Linear(512, classes).
    On 32x32 the pool averages the 4x4 map, as their ``avg_pool2d(out, 4)`` does. The
    last stage must see at least 2x2 (instance norm of a 1x1 map erases the input), so
    images need at least 9 pixels."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        norm: str = "instance",
    ) -> None:
        super().__init__(mean, std)
        if norm not in NORMS:
            raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
        last_side = image_size
        for _ in range(3):  # three stride-2 stages, each rounding up
            last_side = (last_side + 1) // 2
        if last_side < 2:
            raise ConfigError(f"ResNet-18 needs images of at least 9 pixels, got {image_size}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
            make_norm(norm, 64),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm))
            )
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, normalized: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(normalized))).flatten(1)  # (B, 512)


def _variant(factory: Callable[..., ImageClassifier], **fixed: Any) -> NetworkFactory:
    """``factory`` with the options ``fixed`` set. Its signature (which :func:`network_options`
    and :func:`create_network` read) leaves them out, so they cannot be overridden."""
    signature = inspect.signature(factory)

    def variant(**options: Any) -> ImageClassifier:
        return factory(**options, **fixed)

    variant.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name not in fixed]
    )
    return variant


@register_network("convnet")
def _convnet(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    depth: int | None = None,
    width: int = 128,
    norm: str = "instance",
    pooling: str = "avg",
) -> ConvNet:
    """ConvNet-D; ``depth`` None follows the resolution (:func:`default_depth`)."""
    return ConvNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size, mean=mean, std=std,
                   depth=default_depth(image_size) if depth is None else depth, width=width, norm=norm,
                   pooling=pooling)


for _depth in (2, 3, 4, 5):
    register_network(f"convnet{_depth}")(_variant(ConvNet, depth=_depth))
del _depth
register_network("convnet_bn")(_variant(_convnet, norm="batch"))
register_network("alexnet")(AlexNet)
register_network("vgg11")(VGG11)
register_network("vgg11_bn")(_variant(VGG11, norm="batch"))
register_network("resnet18")(ResNet18)
register_network("resnet18_bn")(_variant(ResNet18, norm="batch"))
