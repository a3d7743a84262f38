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
MAX_SEED = 2**32 - 1
"""The largest seed: every seed ncfm derives from it (``seed * 1000 + member`` for the pool,
``seed + r`` for evaluation repeats) stays far inside what torch's generators accept (64 bits)."""
MAX_CALIB_WEIGHT = 1000.0
"""The largest calibration weight: the cross-entropy it weighs is of order 1, so beyond this it
only drowns the matching loss (and far larger figures overflow the loss)."""
INIT_MODES = ("real", "mix", "noise")  # the same as ncfm_core.synset.INIT_MODES (config imports no torch)
MIXTURE_SCALES = (0.05, 20.0)  # psi's per-component scale range (ncfm_core.sampler.MixtureSampler defaults)

FLAGS = {
    "ipc": "--ipc", "data_dir": "--data-dir", "image_size": "--image-size", "network": "--network", "depth": "--depth",
    "width": "--width", "factor": "--factor", "init": "--init", "image_lr": "--lr", "matching": "--matching",
    "iterations": "--iterations", "real_per_class": "--real-per-class", "num_freqs": "--freqs", "alpha": "--alpha",
    "sampler": "--sampler", "num_components": "--components", "calib_weight": "--calib-weight",
    "pool_size": "--pool-size", "pool_epochs": "--pool-epochs", "seed": "--seed", "real_chunk": "--real-chunk",
    "class_chunk": "--class-chunk", "precision": "--precision", "activation_checkpointing": "--checkpointing",
    "channels_last": "--channels-last", "compile": "--compile",
}
"""The ``ncfm distill`` option of each :class:`DistillConfig` field that has one."""


def option_name(field: str, flags: dict[str, str] = FLAGS) -> str:
    """How messages name a setting, so they read right from Python and from the command line:
    the field, then its command-line option (``image_lr (--lr)``); the bare field if it has none."""
    flag = flags.get(field)
    return f"{field} ({flag})" if flag else field


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_number(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_number(high)}"
    return ""


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """``ConfigError`` naming ``name`` unless ``value`` is a number (an int with ``integer``; never a
    bool), finite, and within ``[low, high]`` (an end is left out when None, excluded when open)."""
    kind = "an integer" if integer else "a finite number"
    fits_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    good = fits_type and not isinstance(value, bool) and (integer or math.isfinite(value))
    if good:
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        good = not (below or above)
    if not good:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"{value:.3g}"
        raise ConfigError(f"{name} must be {kind}{_interval(low, high, low_open, high_open)}, got {shown}")


def check_seed(name: str, seed: Any) -> None:
    """A seed is an integer in [0, MAX_SEED]: a negative one is refused by the manifest, a huge one
    by torch, and both only after work has been done."""
    check_range(name, seed, 0, MAX_SEED, integer=True)


def check_weight_decay(name: str, weight_decay: Any, lr_name: str, lr: float) -> None:
    """Weight decay: finite, >= 0, and lr * weight_decay < 1: every step scales the weights by
    1 - lr * weight_decay, which at 1 or more zeroes or flips them (a silent chance-level result)."""
    check_range(name, weight_decay, 0)
    if lr * weight_decay >= 1:
        raise ConfigError(f"{name} {weight_decay:g} is too large for {lr_name} {lr:g}: each step scales the weights "
                          f"by 1 - lr * weight_decay, so lr * weight_decay must stay below 1")


def validate(config: DistillConfig) -> DistillConfig:
    """Every range check on a distillation, before any work, with messages that name the setting
    (``field (--flag)``, :func:`option_name`); returns the config unchanged."""
    # Imported here, not at the top: the losses' modules import this one (DistillConfig), and
    # importing ncfm_core.matching registers them; by the first validate() both are loaded.
    from ncfm_core.kernels import parse_kernels
    from ncfm_core.matching import matching_names, unknown_matching_message

    name = option_name
    counts = [("ipc", 1), ("iterations", 0), ("factor", 1), ("num_freqs", 1), ("real_per_class", 1),
              ("pool_size", 1), ("pool_epochs", 0), ("pool_batch", 1), ("width", 1), ("lr_patience", 0)]
    for field, low in counts:
        check_range(name(field), getattr(config, field), low, integer=True)
    for field in ("depth", "image_size", "real_chunk", "num_components", "class_chunk"):
        if getattr(config, field) is not None:
            check_range(name(field), getattr(config, field), 1, integer=True)
    if config.image_size is not None and config.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(image_size_message(config.image_size))
    check_seed(name("seed"), config.seed)
    check_range(name("image_lr"), config.image_lr, 0, MAX_LR, low_open=True)
    check_range(name("sampler_lr"), config.sampler_lr, 0, MAX_LR, low_open=True)
    check_range(name("pool_lr"), config.pool_lr, 0, MAX_LR, low_open=True)
    check_range(name("alpha"), config.alpha, 0, 1)
    check_range(name("calib_weight"), config.calib_weight, 0, MAX_CALIB_WEIGHT)
    check_range(name("loss_scale"), config.loss_scale, 0, low_open=True)
    check_range(name("pool_momentum"), config.pool_momentum, 0, 1, high_open=True)
    check_weight_decay(name("pool_weight_decay"), config.pool_weight_decay, name("pool_lr"), config.pool_lr)
    if config.sampler:  # psi's scales live in MIXTURE_SCALES; the fixed Gaussian only needs a positive one
        check_range(name("sampler_init_scale"), config.sampler_init_scale, *MIXTURE_SCALES)
    else:
        check_range(name("sampler_init_scale"), config.sampler_init_scale, 0, low_open=True)
    if config.data_dir is not None and not str(config.data_dir).strip():
        raise ConfigError(f"{name('data_dir')} is an empty path; give a folder, or leave it out for the default")
    checks = [
        (config.init in INIT_MODES, f"{name('init')} must be one of {', '.join(INIT_MODES)}, got {config.init!r}"),
        (config.matching in matching_names(), unknown_matching_message(config.matching)),
        (config.precision in PRECISIONS, f"{name('precision')} must be one of {', '.join(PRECISIONS)}"),
        (config.cf_precision in CF_PRECISIONS, f"{name('cf_precision')} must be one of {', '.join(CF_PRECISIONS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if not isinstance(config.kernels, str):
        raise ConfigError(f"kernels must be a text such as 'auto' or 'pool=broadcast,norm=batchnorm', got {config.kernels!r}")
    parse_kernels(config.kernels)  # one-line errors naming the levers and their choices
    return config
