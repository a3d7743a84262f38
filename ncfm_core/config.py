"""Frozen job configurations with per-dataset presets.

A distillation is described by one :class:`DistillConfig`, built once by :func:`make_config`
(defaults <- dataset preset <- explicit overrides) and saved into the artifact manifest, so a
result always knows how it was made and ``resume`` rebuilds exactly the same job. Each dataset
registers its preset beside its loader (``ncfm_core.data``, ``register_dataset(preset=...)``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from ncfm_core.data.registry import MAX_IMAGE_SIZE, dataset_preset, image_size_message
from ncfm_core.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CF_PRECISIONS = ("auto", "fp32", "tf32")  # the same as ncfm_core.cf.CF_PRECISIONS (config imports no torch)


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (and nothing that does not)."""

    dataset: str  # registry name, e.g. "cifar10", "digits", "folder:/data/x", "fake"
    ipc: int  # stored synthetic images per class
    data_dir: str | None = None  # where the dataset files live (None: the default cache)
    image_size: int | None = None  # resize folder datasets to this (None: dataset default)
    # feature extractor
    network: str = "convnet"
    depth: int | None = None  # None: by resolution (32 -> 3, 64 -> 4, 128 -> 5)
    width: int = 128
    norm: str = "instance"
    # synthetic set
    factor: int = 2  # multi-formation: each stored image holds factor^2 tiles
    init: str = "mix"  # real | mix | noise
    image_lr: float = 0.01  # AdamW on the stored pixels
    lr_patience: int = 500  # ReduceLROnPlateau patience, in iterations
    # matching
    matching: str = "ncfm"  # a registered matching loss (ncfm_core.matching): ncfm, mmd, ...
    iterations: int = 20000
    real_per_class: int = 1024  # real images drawn per class per iteration
    num_freqs: int = 1024  # F, frequencies per iteration
    alpha: float = 0.5  # amplitude weight; 1 - alpha weighs the phase term
    normalize_features: bool = True
    loss_scale: float = 1.0  # the authors use 300; irrelevant to Adam up to its eps
    sampler: bool = True  # learn the frequency distribution (psi) by gradient ascent
    num_components: int | None = None  # mixture components of psi (None: num_freqs // 16)
    sampler_lr: float = 0.001
    sampler_init_scale: float = 1.0
    calib_weight: float = 1.0  # cross-entropy calibration step under a trained pool member (0: off)
    dsa_strategy: str = "color_crop_cutout"
    # feature-extractor pool
    pool_size: int = 20
    pool_epochs: int = 60
    pool_lr: float = 0.01
    pool_momentum: float = 0.9
    pool_weight_decay: float = 5e-4
    pool_batch: int = 256
    # run
    seed: int = 0
    real_chunk: int | None = None  # real images per no-grad forward chunk (None: planner decides)
    # memory plan and speed (ncfm_core.planner fills these in to fit a budget)
    class_chunk: int | None = None  # classes per synthetic forward/backward (None: all at once)
    precision: str = "auto"  # network forwards: auto | fp32 | bf16 | fp16 autocast; CF maths stay fp32
    cf_precision: str = "auto"  # CF projections <t, f>: auto (tf32 on CUDA, else fp32) | fp32 | tf32 (ncfm_core.cf)
    activation_checkpointing: bool = False  # recompute activations (and psi's real features), not store
    channels_last: bool | None = None  # NHWC memory format for the networks (None: the measured default, off)
    compile: bool = False  # shorthand for the compile lever (kernels): True turns it on
    # kernel levers (ncfm_core.kernels): "auto" (the device's defaults), "default" (today's path),
    # or LEVER=CHOICE items, e.g. "auto,compile=off"; decided once by the plan into every lever
    kernels: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        if "kernels" not in data:  # recorded before the kernel levers: it ran today's path
            data = {**data, "kernels": "default"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}: written by a newer ncfm?")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not _fits(value, hints[name]):
                raise TypeError(f"config field {name!r} is {value!r}, expected {_type_name(hints[name])}")
        return cls(**data)

    def replace(self, **changes: Any) -> DistillConfig:
        return validate(dataclasses.replace(self, **changes))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type of a config field (an int for a float field, never a bool
    for a number)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if (option is int and isinstance(value, int)) or (option is float and isinstance(value, (int, float))):
            return True
        if option is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def preset_for(dataset: str) -> dict[str, Any]:
    """The preset overrides for a dataset name (``folder:PATH`` uses the paper's defaults)."""
    return dataset_preset(dataset)


def make_config(dataset: str, ipc: int, **overrides: Any) -> DistillConfig:
    """Defaults <- dataset preset <- overrides (overrides equal to None are ignored)."""
    fields = preset_for(dataset)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    return validate(DistillConfig(dataset=dataset, ipc=ipc, **fields))


MAX_LR = 10.0
"""The largest learning rate accepted: pixels live in [0, 1], so a step beyond this is no longer
a learning rate (and far larger figures overflow float32)."""


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: DistillConfig) -> DistillConfig:
    """Range checks with messages that name the option; returns the config unchanged."""
    # Imported here, not at the top: the losses' modules import this one (DistillConfig), and
    # importing ncfm_core.matching registers them; by the first validate() both are loaded.
    from ncfm_core.kernels import parse_kernels
    from ncfm_core.matching import matching_names, unknown_matching_message

    for option, value in (("--lr", config.image_lr), ("--alpha", config.alpha), ("--calib-weight", config.calib_weight),
                          ("sampler_lr", config.sampler_lr), ("sampler_init_scale", config.sampler_init_scale),
                          ("loss_scale", config.loss_scale), ("pool_lr", config.pool_lr),
                          ("pool_momentum", config.pool_momentum), ("pool_weight_decay", config.pool_weight_decay)):
        if not _finite(value):
            raise ConfigError(f"{option} must be a finite number, got {value!r}")
    checks = [
        (config.image_size is None or config.image_size >= 1, "--image-size must be >= 1"),
        (config.image_size is None or config.image_size <= MAX_IMAGE_SIZE, image_size_message(config.image_size or 0)),
        (config.image_lr <= MAX_LR, f"--lr {config.image_lr:g} is too large: use a learning rate in (0, {MAX_LR:g}]"),
        (config.calib_weight >= 0, "--calib-weight must be >= 0"),
        (config.ipc >= 1, "--ipc must be >= 1"),
        (config.iterations >= 0, "--iterations must be >= 0"),
        (config.factor >= 1, "--factor must be >= 1"),
        (0.0 <= config.alpha <= 1.0, "--alpha must lie in [0, 1]"),
        (config.num_freqs >= 1, "--freqs must be >= 1"),
        (config.real_per_class >= 1, "--real-per-class must be >= 1"),
        (config.pool_size >= 1, "--pool-size must be >= 1"),
        (config.pool_epochs >= 0, "--pool-epochs must be >= 0"),
        (config.image_lr > 0, "--lr must be > 0"),
        (config.matching in matching_names(), unknown_matching_message(config.matching)),
        (config.real_chunk is None or config.real_chunk >= 1, "--real-chunk must be >= 1"),
        (config.num_components is None or config.num_components >= 1, "--components must be >= 1"),
        (config.class_chunk is None or config.class_chunk >= 1, "--class-chunk must be >= 1"),
        (config.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
        (config.cf_precision in CF_PRECISIONS, f"cf_precision must be one of {', '.join(CF_PRECISIONS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if not isinstance(config.kernels, str):
        raise ConfigError(f"kernels must be a text such as 'auto' or 'pool=broadcast,norm=batchnorm', got {config.kernels!r}")
    parse_kernels(config.kernels)  # one-line errors naming the levers and their choices
    return config
