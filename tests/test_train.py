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


# --------------------------------------------------------------------------- CutMix, crops, losses, stacking

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from ncfm_core import augment  # noqa: E402
from ncfm_core.data import load_dataset  # noqa: E402
from ncfm_core.models import create_network  # noqa: E402
from ncfm_core.train import (  # noqa: E402
    StackedNetworks,
    TrainingBatch,
    apply_cutmix,
    apply_resized_crops,
    augmented_batch,
    can_stack,
    distillation_kl,
    mix_targets,
    per_sample_loss,
    sample_cutmix,
    sample_resized_crops,
    soft_target_cross_entropy,
    train_classifiers_batched,
)


def test_cutmix_label_weights_equal_the_pasted_area_fraction_exactly():
    repeats, batch, channels, height, width = 3, 5, 2, 9, 7
    gen = torch.Generator().manual_seed(1)
    # distinct pixel values, so "came from the partner" is visible pixel by pixel
    images = torch.randperm(repeats * batch * channels * height * width, generator=gen).float()
    images = images.view(repeats, batch, channels, height, width)
    labels = torch.randint(0, 4, (repeats, batch), generator=gen)
    for trial in range(20):
        draws = [sample_cutmix(batch, height, width, 1.0, gen) for _ in range(repeats)]
        boxes = torch.stack([box for box, _ in draws])
        partners = torch.stack([p for _, p in draws])
        mixed, fractions = apply_cutmix(images, boxes, partners)
        targets = mix_targets(F.one_hot(labels, 4).double(), partners, fractions.double())
        for r in range(repeats):
            top, bottom, left, right = boxes[r].tolist()
            for b in range(batch):
                partner = int(partners[r, b])
                expected = images[r, b].clone()
                pasted = 0
                for i in range(height):
                    for j in range(width):
                        if top <= i < bottom and left <= j < right:
                            expected[:, i, j] = images[r, partner, :, i, j]
                            pasted += 1
                assert torch.equal(mixed[r, b], expected)
                fraction = pasted / (height * width)
                assert fractions[r].item() == pytest.approx(fraction, abs=1e-7), (trial, r, fractions[r], fraction)
                reference = [0.0] * 4
                reference[int(labels[r, b])] += 1.0 - fraction
                reference[int(labels[r, partner])] += fraction
                assert targets[r, b].tolist() == pytest.approx(reference, abs=1e-7)
        assert sorted(partners[0].tolist()) == list(range(batch))


def test_cutmix_box_follows_the_standard_recipe_and_probability():
    gen = torch.Generator().manual_seed(2)
    applied = 0
    for _ in range(600):
        box, _ = sample_cutmix(8, 32, 32, 0.5, gen)
        top, bottom, left, right = box.tolist()
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        applied += bottom > top
    # gate < 0.5 mixes; a box is empty otherwise (or when lam is within 0.4% of 1)
    assert 0.42 < applied / 600 < 0.58


def test_cutmix_probability_zero_is_identity_and_draws_nothing():
    gen = torch.Generator().manual_seed(3)
    box, partners = sample_cutmix(4, 6, 6, 0.0, gen)
    assert box[0] == box[1]  # empty
    images = torch.rand(1, 4, 1, 6, 6, generator=gen)
    mixed, fractions = apply_cutmix(images, box[None], partners[None])
    assert torch.equal(mixed, images) and fractions.tolist() == [0.0]
    # In training, p = 0 takes no draws at all: the generator's stream is the shuffle alone.
    settings = TrainSettings(epochs=1, lr=0.1, cutmix_prob=0.0)
    data = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=gen)
    before = torch.Generator().manual_seed(9)
    batch = augmented_batch(data, torch.arange(6), torch.tensor([[0, 1, 2]]), settings, [before])
    assert batch.partners is None and torch.equal(batch.images[0], data[:3].float() / 255)
    assert torch.equal(before.get_state(), torch.Generator().manual_seed(9).get_state())


def _bilinear_border_reference(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of (C, H, W) at pixel coordinates (x, y), clamped to the border."""
    _, height, width = image.shape
    x = min(max(x, 0.0), width - 1.0)
    y = min(max(y, 0.0), height - 1.0)
    x0, y0 = math.floor(x), math.floor(y)
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    wx, wy = x - x0, y - y0
    return ((1 - wy) * ((1 - wx) * image[:, y0, x0] + wx * image[:, y0, x1])
            + wy * ((1 - wx) * image[:, y1, x0] + wx * image[:, y1, x1]))


def test_random_resized_crop_matches_a_loop_reference():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(6, 2, 7, 9, generator=gen, dtype=torch.float64)
    boxes = sample_resized_crops(6, 0.3, gen).double()
    out = apply_resized_crops(images, boxes)
    assert out.shape == images.shape
    for n in range(6):
        w, h, cx, cy = boxes[n].tolist()
        for i in range(7):
            for j in range(9):
                u, v = (2 * j + 1) / 9 - 1, (2 * i + 1) / 7 - 1
                x = ((cx + w * u + 1) * 9 - 1) / 2  # normalised -> pixel coordinates
                y = ((cy + h * v + 1) * 7 - 1) / 2
                expected = _bilinear_border_reference(images[n], x, y)
                assert torch.allclose(out[n, :, i, j], expected, atol=1e-10), (n, i, j)


def test_random_resized_crop_boxes_shapes_and_determinism():
    boxes = sample_resized_crops(500, 0.5, torch.Generator().manual_seed(5))
    again = sample_resized_crops(500, 0.5, torch.Generator().manual_seed(5))
    other = sample_resized_crops(500, 0.5, torch.Generator().manual_seed(6))
    assert boxes.shape == (500, 4) and torch.equal(boxes, again) and not torch.equal(boxes, other)
    width, height, cx, cy = boxes.unbind(1)
    assert bool((width > 0).all() and (width <= 1).all() and (height > 0).all() and (height <= 1).all())
    assert bool((cx.abs() + width <= 1 + 1e-6).all() and (cy.abs() + height <= 1 + 1e-6).all())  # inside the image
    assert float((width * height).min()) >= 0.5 * 0.75 - 1e-6  # clipping a side loses at most ratio 3/4
    assert float((width * height).max()) <= 1.0 + 1e-6
    images = torch.rand(500, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(apply_resized_crops(images, boxes), apply_resized_crops(images, again))
    # the full box is the identity
    full = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(500, 4)
    assert torch.allclose(apply_resized_crops(images, full), images, atol=1e-6)


def test_soft_target_cross_entropy_equals_hard_cross_entropy_on_one_hot_and_gradchecks():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 5), generator=gen)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    assert torch.allclose(soft_target_cross_entropy(logits, F.one_hot(labels, 4).double()), expected, atol=1e-12)
    targets = torch.softmax(torch.randn(2, 5, 4, generator=gen, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: soft_target_cross_entropy(x, targets), (logits.requires_grad_(),))


def test_distillation_kl_matches_a_hand_computation_times_t_squared():
    student = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    temperature = 2.0

    def softmax(values):
        exps = [math.exp(v / temperature) for v in values]
        return [e / sum(exps) for e in exps]

    p_teacher, p_student = softmax([0.5, -1.0, 2.0]), softmax([1.0, 2.0, 0.0])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student))
    teacher_before = teacher.clone()
    value = distillation_kl(student, teacher, temperature)
    assert value.shape == (1,)
    assert float(value) == pytest.approx(kl * temperature**2, abs=1e-12)
    assert torch.equal(teacher, teacher_before)
    assert float(distillation_kl(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distillation_kl(x, t, 1.7), (s,))


class _RecordingTeacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 3)
        self.seen: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        out = self.linear(x.flatten(1))
        self.returned.append(out.detach().clone())
        return out


def test_soft_label_loss_uses_the_teacher_on_the_same_augmented_batch():
    gen = torch.Generator().manual_seed(10)
    data = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8, generator=gen)
    settings = TrainSettings(epochs=1, lr=0.1, dsa_strategy="color_crop", cutmix_prob=1.0,
                             random_resized_crop=True, temperature=2.0)
    batch = augmented_batch(data, torch.arange(8) % 3, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), settings,
                            [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    teacher = _RecordingTeacher()
    student_logits = torch.randn(2, 4, 3, generator=gen)
    loss = per_sample_loss(student_logits, batch, teacher, 2.0)
    assert torch.equal(teacher.seen[0], batch.images.flatten(0, 1))  # the student's own augmented images
    expected = distillation_kl(student_logits, teacher.returned[0].view(2, 4, 3), 2.0)
    assert torch.allclose(loss, expected, atol=1e-7)
    # without a teacher, CutMix's mixed labels are the targets
    hard = per_sample_loss(student_logits, batch, None, 2.0)
    assert torch.allclose(hard, soft_target_cross_entropy(student_logits, batch.targets(3)), atol=1e-7)


def test_training_batch_without_cutmix_gives_one_hot_targets():
    batch = TrainingBatch(torch.zeros(1, 2, 1, 2, 2), torch.tensor([[2, 0]]))
    assert batch.targets(3).tolist() == [[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]


def _fake():
    return load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=6)


def _tiny_convnets(count: int, dataset, norm: str = "instance") -> list[torch.nn.Module]:
    nets = []
    for seed in range(count):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets.append(create_network("convnet", in_channels=1, num_classes=3, image_size=8,
                                       mean=dataset.mean, std=dataset.std, depth=1, width=8, norm=norm))
    return nets


@pytest.mark.parametrize("optimizer, with_teacher", [("adamw", False), ("sgd", True)])
def test_stacked_training_equals_training_each_repeat_alone(optimizer, with_teacher):
    dataset = _fake()
    settings = TrainSettings(epochs=3, lr=0.01 if optimizer == "adamw" else 0.05, optimizer=optimizer,
                             batch_size=16, weight_decay=0.01, schedule="step_half",
                             dsa_strategy=augment.EVAL_STRATEGY, cutmix_prob=0.5, random_resized_crop=True,
                             temperature=2.0)
    teacher = _tiny_convnets(4, dataset)[3] if with_teacher else None
    teacher_state = None if teacher is None else {k: v.clone() for k, v in teacher.state_dict().items()}
    alone = _tiny_convnets(3, dataset)
    for r, net in enumerate(alone):
        train_classifier(net, dataset.train_images, dataset.train_labels, settings,
                         torch.Generator().manual_seed(100 + r), teacher=teacher)
    together = _tiny_convnets(3, dataset)
    losses = []
    train_classifiers_batched(together, dataset.train_images, dataset.train_labels, settings,
                              [torch.Generator().manual_seed(100 + r) for r in range(3)], teacher=teacher,
                              on_epoch=lambda epoch, values: losses.append(values))
    assert len(losses) == 3 and all(len(values) == 3 for values in losses)
    test_images = dataset.test_images.float() / 255
    for r in range(3):
        for (name, a), b in zip(alone[r].state_dict().items(), together[r].state_dict().values()):
            if name.endswith("conv.bias"):
                # A bias followed by instance norm is subtracted out again: its exact gradient is
                # zero, so it moves only by weight decay plus rounding noise, which Adam scales up
                # to lr-sized steps. The network's function does not depend on it (logits below).
                continue
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (r, name, (a - b).abs().max())
        with torch.no_grad():
            assert torch.allclose(alone[r](test_images), together[r](test_images), atol=1e-5)
        assert accuracy(alone[r], dataset.test_images, dataset.test_labels) == accuracy(
            together[r], dataset.test_images, dataset.test_labels)
    # repeats really differ (own init, own data order and draws)
    assert not torch.allclose(together[0].classifier.weight, together[1].classifier.weight)
    if teacher is not None:
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_stacking_refuses_batch_norm_and_reports_per_repeat_accuracy():
    dataset = _fake()
    assert can_stack(_tiny_convnets(1, dataset)[0])
    bn = _tiny_convnets(1, dataset, norm="batch")[0]
    assert not can_stack(bn)
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        StackedNetworks([bn])
    nets = _tiny_convnets(2, dataset)
    stacked = StackedNetworks(nets)
    expected = [accuracy(net, dataset.test_images, dataset.test_labels) for net in nets]
    assert stacked.accuracies(dataset.test_images, dataset.test_labels, batch_size=5) == pytest.approx(expected)
