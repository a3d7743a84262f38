import pytest
import torch

from ncfm_core.errors import ConfigError
from ncfm_core.train import TrainSettings, accuracy, as_float_images, lr_factor, train_classifier


def test_step_half_schedule_halves_at_each_fifth():
    epochs = 100
    factors = [lr_factor("step_half", e, epochs) for e in range(epochs)]
    assert factors[0] == factors[19] == 1.0
    assert factors[20] == 0.5 and factors[40] == 0.25 and factors[60] == 0.125 and factors[80] == 0.0625
    assert factors[99] == 0.0625


def test_half_tenth_and_none_schedules():
    assert [lr_factor("half_tenth", e, 10) for e in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]
    assert all(lr_factor("none", e, 10) == 1.0 for e in range(10))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="optimizer"):
        TrainSettings(epochs=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="schedule"):
        TrainSettings(epochs=1, lr=0.1, schedule="cosine")


def test_as_float_images_scales_uint8_only():
    assert torch.equal(as_float_images(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    assert torch.equal(as_float_images(torch.tensor([0.25])), torch.tensor([0.25]))


def test_training_learns_a_separable_problem_and_accuracy_counts_correctly():
    # Two classes: dark vs bright images. A linear model must learn it.
    gen = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 60, (20, 1, 4, 4), generator=gen, dtype=torch.uint8)
    bright = torch.randint(190, 256, (20, 1, 4, 4), generator=gen, dtype=torch.uint8)
    images = torch.cat([dark, bright])
    labels = torch.tensor([0] * 20 + [1] * 20)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    settings = TrainSettings(epochs=30, lr=0.5, optimizer="sgd", batch_size=8, weight_decay=0.0)
    losses = []
    train_classifier(net, images, labels, settings, gen, on_epoch=lambda e, loss: losses.append(loss))
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert accuracy(net, images, labels, batch_size=7) == 1.0
    # accuracy is a plain fraction: flip half the labels of one class
    wrong = labels.clone()
    wrong[:10] = 1
    assert accuracy(net, images, wrong) == pytest.approx(30 / 40)
