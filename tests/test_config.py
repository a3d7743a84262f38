import dataclasses

import pytest

from ncfm_core.config import DistillConfig, make_config, preset_for
from ncfm_core.errors import ConfigError


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
