import dataclasses

import pytest

from ncfm_core.config import DistillConfig, make_config, preset_for
from ncfm_core.data import dataset_names
from ncfm_core.errors import ConfigError

# preset_for of every name as config.PRESETS gave it before the presets moved beside the loaders.
_PAPER = dict(factor=2, iterations=20000, real_per_class=1024, num_freqs=1024, pool_size=20, pool_epochs=60)
# digits: sized for the README's first command on a laptop CPU (tests/test_quality_digits.py measures it)
_DIGITS = dict(_PAPER, iterations=100, real_per_class=64, num_freqs=256, pool_size=2, pool_epochs=3, pool_batch=128,
               lr_patience=200)
_FAKE = dict(factor=2, iterations=200, real_per_class=64, num_freqs=256, pool_size=2, pool_epochs=2)
EXPECTED_PRESETS = {
    "cifar10": _PAPER,
    "cifar100": _PAPER,
    "tinyimagenet": _PAPER,
    **dict.fromkeys(("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow"), _PAPER),
    "digits": _DIGITS,
    # mnist5k is new (sized for a 2-core CPU; tests/test_quality_mnist.py measures it)
    "mnist5k": dict(factor=2, iterations=100, real_per_class=32, num_freqs=1024, pool_size=2, pool_epochs=2,
                    pool_batch=128, lr_patience=200, calib_weight=0.0),
    "fake": _FAKE,
    "folder:PATH": {},  # DistillConfig's own defaults, which are the paper's settings
    "folder:/some/where": {},
    "fake:anything": _FAKE,  # looked up by the part before the colon
    "no-such-dataset": {},
}


def test_presets_follow_the_paper_and_overrides_win():
    cifar = make_config("cifar100", 50)
    assert (cifar.factor, cifar.real_per_class, cifar.num_freqs, cifar.pool_size, cifar.pool_epochs) == (
        2,
        1024,
        1024,
        20,
        60,
    )
    digits = make_config("digits", 1, factor=1, iterations=None)
    assert digits.factor == 1
    assert digits.iterations == preset_for("digits")["iterations"]  # None means "not given"
    assert make_config("folder:/some/where", 1).factor == 2


@pytest.mark.parametrize("name", sorted({*dataset_names(), *EXPECTED_PRESETS}))
def test_preset_for_every_name_is_unchanged(name):
    preset = preset_for(name)
    assert preset == EXPECTED_PRESETS[name]
    preset["factor"] = 99  # a copy: the registered preset stays as it was
    assert preset_for(name) == EXPECTED_PRESETS[name]
    config = make_config(name, 1)
    expected = {**_PAPER, **EXPECTED_PRESETS[name]}
    assert {key: getattr(config, key) for key in expected} == expected
    assert make_config(name, 1, factor=3).factor == 3


def test_config_round_trips_through_a_dict():
    config = make_config("digits", 3, alpha=0.7, sampler=False)
    assert DistillConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config field"):
        DistillConfig.from_dict({**config.to_dict(), "warp_drive": 1})


def test_config_is_frozen():
    config = make_config("digits", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ipc = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(alpha=1.5), "--alpha"),
        (dict(factor=0), "--factor"),
        (dict(matching="kl"), "--matching"),
        (dict(num_freqs=0), "--freqs"),
        (dict(warp=1), "unknown option"),
    ],
)
def test_invalid_options_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("digits", 1, **overrides)
    with pytest.raises(ConfigError, match="--ipc"):
        make_config("digits", 0)
