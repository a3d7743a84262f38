import dataclasses
import json
import re

import pytest
import torch

from ncfm_core import augment
from ncfm_core.data import load_dataset
from ncfm_core.errors import ConfigError
from ncfm_core.evaluate import (
    PROTOCOLS,
    EvalConfig,
    EvalResult,
    baseline_cache_key,
    default_protocol,
    evaluate_full_baseline,
    evaluate_images,
    evaluate_models,
    evaluate_random_baseline,
    evaluate_synset,
    protocol_config,
    protocol_names,
    random_real_subset,
    teacher_from_pool,
)
from ncfm_core.pool import PoolSpec, train_pool


@pytest.fixture(scope="module")
def fake():
    return load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=6)


def tiny(**overrides) -> EvalConfig:
    """The ncfm protocol on a network and schedule small enough for a unit test."""
    values = {"epochs": 2, "repeats": 3, "width": 8, "batch_size": 16, **overrides}
    return protocol_config(values.pop("protocol", "ncfm"), **values)


# --------------------------------------------------------------------------- protocols


def test_named_protocols_set_the_published_knobs():
    assert protocol_names() == ["ncfm", "dsa", "quick"]
    ncfm = protocol_config("ncfm")
    assert (ncfm.optimizer, ncfm.lr, ncfm.batch_size, ncfm.schedule) == ("adamw", 0.001, 128, "step_half")
    assert (ncfm.cutmix_prob, ncfm.random_resized_crop, ncfm.dsa_strategy) == (0.5, True, augment.EVAL_STRATEGY)
    assert ncfm.epochs == 300 and ncfm.protocol == "ncfm" and not ncfm.soft_labels and not ncfm.best_over_epochs
    dsa = protocol_config("DSA")
    assert (dsa.optimizer, dsa.lr, dsa.momentum, dsa.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (dsa.schedule, dsa.batch_size, dsa.cutmix_prob, dsa.random_resized_crop) == ("half_tenth", 256, 0.0, False)
    assert dsa.dsa_strategy == augment.EVAL_STRATEGY and dsa.protocol == "dsa"
    # EvalConfig's defaults are the ncfm protocol
    assert EvalConfig() == ncfm


def test_overrides_apply_and_are_recorded():
    config = protocol_config("dsa", epochs=7, lr=0.05, model="alexnet", repeats=4, seed=3, depth=None)
    assert (config.epochs, config.lr, config.model, config.repeats, config.seed) == (7, 0.05, "alexnet", 4, 3)
    assert config.overrides() == {"epochs": 7, "lr": 0.05}
    recorded = config.to_dict()
    assert recorded["protocol"] == "dsa" and recorded["epochs"] == 7 and recorded["optimizer"] == "sgd"
    assert set(recorded) == {f.name for f in dataclasses.fields(EvalConfig)}
    assert EvalConfig.from_dict(json.loads(json.dumps(recorded))) == config
    assert protocol_config("ncfm").overrides() == {}


def test_unknown_protocol_knob_or_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="ncfm, dsa"):
        protocol_config("dd-ranking")
    with pytest.raises(ConfigError, match="lr_decay"):
        protocol_config("ncfm", lr_decay=0.5)
    with pytest.raises(ConfigError, match="cutmix_prob"):
        protocol_config("ncfm", cutmix_prob=1.5)
    with pytest.raises(ConfigError, match="repeat_mode"):
        protocol_config("ncfm", repeat_mode="parallel")
    with pytest.raises(ConfigError, match="temperature"):
        protocol_config("ncfm", temperature=0.0)
    with pytest.raises(ConfigError, match="protocol"):
        EvalConfig(protocol="mine")
    with pytest.raises(ConfigError, match="unknown evaluation setting"):
        EvalConfig.from_dict({"epochs": 3, "colour": "red"})


# --------------------------------------------------------------------------- repeats: batched, sequential


def test_quick_protocol_is_ncfm_trained_shorter_on_a_narrower_net_without_mixing_augmentations():
    quick, ncfm = protocol_config("quick"), protocol_config("ncfm")
    assert (quick.epochs, quick.width, quick.cutmix_prob, quick.random_resized_crop) == (100, 64, 0.0, False)
    same = ("lr", "optimizer", "weight_decay", "batch_size", "schedule", "dsa_strategy", "repeats", "model", "seed")
    assert all(getattr(quick, knob) == getattr(ncfm, knob) for knob in same)
    assert quick.protocol == "quick" and quick.overrides() == {}
    assert protocol_config("quick", width=32).overrides() == {"width": 32}
    # the small offline datasets default to it; everything else keeps the paper's protocol
    assert [default_protocol(name) for name in ("digits", "mnist5k", "cifar10", "imagenette", "fake", "folder:/x")] == [
        "quick", "quick", "ncfm", "ncfm", "ncfm", "ncfm"]


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_every_epoch_is_reported_and_reporting_changes_nothing(fake, mode):
    epochs = []
    config = tiny(epochs=3, repeat_mode=mode)
    reported = evaluate_images(fake.train_images, fake.train_labels, fake, config, "cpu",
                               on_epoch=lambda repeats, epoch, loss, seconds: epochs.append((repeats, epoch, loss,
                                                                                             seconds)))
    silent = evaluate_images(fake.train_images, fake.train_labels, fake, config, "cpu")
    assert reported.runs == silent.runs
    if mode == "sequential":  # one network after another, each epoch in order
        assert [(r, e) for r, e, _, _ in epochs] == [(range(r, r + 1), e) for r in range(3) for e in range(3)]
    else:  # all three at once
        assert [(r, e) for r, e, _, _ in epochs] == [(range(0, 3), e) for e in range(3)]
    assert all(loss > 0 and seconds > 0 for _, _, loss, seconds in epochs)


def test_batched_and_sequential_repeats_agree_and_each_is_reproducible(fake):
    results = {}
    for mode in ("batched", "sequential"):
        first = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(repeat_mode=mode), "cpu")
        again = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(repeat_mode=mode), "cpu")
        assert first.training == mode and first.runs == again.runs  # same seed, same numbers
        results[mode] = first
    batched, sequential = results["batched"], results["sequential"]
    assert batched.seeds == sequential.seeds == [0, 1, 2]
    # Weights agree to float rounding (tests/test_train.py); on 18 test images that is the same count.
    assert batched.runs == sequential.runs
    other_seed = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(seed=10), "cpu")
    assert other_seed.seeds == [10, 11, 12]
    assert tiny(repeat_mode="auto").repeat_mode == "auto"


def test_auto_mode_is_sequential_on_cpu_and_batch_norm_falls_back(fake):
    auto = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(epochs=1), "cpu")
    assert auto.training == "sequential"  # stacking pays off on CUDA only (docs/benchmarks/eval_speed.md)
    forced = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(epochs=1, repeat_mode="batched"), "cpu")
    assert forced.training == "batched" and set(forced.to_dict()) == set(auto.to_dict())
    single = evaluate_images(fake.train_images, fake.train_labels, fake,
                             tiny(epochs=1, repeats=1, repeat_mode="batched"), "cpu")
    assert single.training == "batched" and len(single.runs) == 1
    bn = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(model="convnet_bn"), "cpu")
    bn_again = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(model="convnet_bn"), "cpu")
    assert bn.training == "sequential" and len(bn.runs) == 3 and bn.runs == bn_again.runs
    assert set(bn.to_dict()) == set(forced.to_dict())  # one result API for both paths
    with pytest.raises(ConfigError, match="batch norm"):
        evaluate_images(fake.train_images, fake.train_labels, fake, tiny(model="convnet_bn", repeat_mode="batched"),
                        "cpu")


def test_result_reports_final_epoch_and_labels_best_over_epochs_separately(fake):
    reported = []
    plain = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(epochs=3), "cpu",
                            on_repeat=lambda r, acc: reported.append((r, acc)))
    assert reported == list(enumerate(plain.runs))
    record = plain.to_dict()
    assert "best_over_epochs_test_acc" not in record
    assert record["mean"] == pytest.approx(sum(plain.runs) / 3, abs=1e-12)
    assert record["runs"] == plain.runs and record["protocol"]["epochs"] == 3 and record["seeds"] == [0, 1, 2]
    json.dumps(record)
    for mode in ("batched", "sequential"):
        tracked = evaluate_images(fake.train_images, fake.train_labels, fake,
                                  tiny(epochs=3, best_over_epochs=True, repeat_mode=mode), "cpu")
        assert tracked.runs == plain.runs  # tracking does not change the reported final accuracy
        assert all(best >= final for best, final in zip(tracked.best_over_epochs, tracked.runs))
        best = tracked.to_dict()["best_over_epochs_test_acc"]
        assert best["runs"] == tracked.best_over_epochs and "test set" in best["note"]
        assert tracked.to_dict()["mean"] == plain.mean


def test_mean_and_std_of_result():
    result = EvalResult([0.5, 0.7, 0.6], 1.0, {})
    assert result.mean == pytest.approx(0.6) and result.std == pytest.approx((0.02 / 3) ** 0.5)
    assert EvalResult([0.4], 1.0, {}).std == 0.0


# --------------------------------------------------------------------------- soft labels


@pytest.fixture(scope="module")
def tiny_pool(fake):
    spec = PoolSpec(dataset_fingerprint=fake.fingerprint, network="convnet", depth=1, width=8, norm="instance",
                    in_channels=1, num_classes=3, image_size=8, mean=fake.mean, std=fake.std, size=2, epochs=2,
                    lr=0.01, momentum=0.9, weight_decay=5e-4, batch=16, seed=0, dsa_strategy="color_crop_cutout")
    return train_pool(spec, fake, "cpu")


def test_teacher_from_pool_is_the_trained_member(tiny_pool):
    teacher = teacher_from_pool(tiny_pool, 1, "cpu")
    assert not teacher.training
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, tiny_pool.trained_states[1][name])
    with pytest.raises(ConfigError, match="0..1"):
        teacher_from_pool(tiny_pool, 2, "cpu")


def test_soft_labels_need_a_teacher_and_leave_it_untouched(fake, tiny_pool):
    teacher = teacher_from_pool(tiny_pool, 0, "cpu")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(ConfigError, match="teacher"):
        evaluate_images(fake.train_images, fake.train_labels, fake, tiny(soft_labels=True), "cpu")
    with pytest.raises(ConfigError, match="soft_labels"):
        evaluate_images(fake.train_images, fake.train_labels, fake, tiny(), "cpu", teacher=teacher)
    soft = {}
    for mode in ("batched", "sequential"):
        config = tiny(soft_labels=True, temperature=4.0, repeat_mode=mode)
        soft[mode] = evaluate_images(fake.train_images, fake.train_labels, fake, config, "cpu", teacher=teacher)
        assert soft[mode].protocol["soft_labels"] and soft[mode].protocol["temperature"] == 4.0
    assert soft["batched"].runs == soft["sequential"].runs
    hard = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(), "cpu")
    assert not hard.protocol["soft_labels"]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- synthetic sets, architectures


def test_evaluate_synset_decodes_multi_formation(fake):
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = evaluate_synset(images, torch.arange(3), 2, fake, tiny(epochs=1, repeats=2), "cpu")
    assert result.train_set == {"kind": "synthetic", "stored": 3, "factor": 2, "size": 12}
    assert len(result.runs) == 2


def test_cross_architecture_evaluation_returns_one_result_per_model(fake):
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6) % 3
    seen = []
    results = evaluate_models(images, labels, fake, tiny(epochs=1, repeats=2), "cpu",
                              ["convnet", "convnet_bn", "ConvNet"], on_repeat=lambda m, r, acc: seen.append((m, r)))
    assert list(results) == ["convnet", "convnet_bn"]
    assert results["convnet"].protocol["model"] == "convnet" and results["convnet_bn"].protocol["model"] == "convnet_bn"
    assert results["convnet_bn"].protocol["width"] == 8  # the shape knobs reach every ConvNet variant
    assert seen == [("convnet", 0), ("convnet", 1), ("convnet_bn", 0), ("convnet_bn", 1)]
    alone = evaluate_images(images, labels, fake, tiny(epochs=1, repeats=2), "cpu")
    assert results["convnet"].runs == alone.runs
    with pytest.raises(ConfigError, match="unknown network"):
        evaluate_models(images, labels, fake, tiny(epochs=1), "cpu", ["transformer"])


# --------------------------------------------------------------------------- baselines


def test_random_baseline_is_the_same_protocol_on_a_seeded_real_subset(fake):
    images, labels = random_real_subset(fake, 2, seed=5)
    again, _ = random_real_subset(fake, 2, seed=5)
    other, _ = random_real_subset(fake, 2, seed=6)
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    baseline = evaluate_random_baseline(fake, 2, tiny(), "cpu", seed=5)
    direct = evaluate_images(images, labels, fake, tiny(), "cpu")
    assert baseline.runs == direct.runs and baseline.protocol == direct.protocol
    assert baseline.train_set == {"kind": "random", "ipc": 2, "subset_seed": 5, "size": 6}
    with pytest.raises(ConfigError, match="IPC 13"):
        evaluate_random_baseline(fake, 13, tiny(), "cpu", seed=0)


def test_full_baseline_trains_on_the_whole_training_set(fake):
    full = evaluate_full_baseline(fake, tiny(epochs=1, repeats=2), "cpu")
    direct = evaluate_images(fake.train_images, fake.train_labels, fake, tiny(epochs=1, repeats=2), "cpu")
    assert full.runs == direct.runs and full.train_set == {"kind": "full", "size": 36}


def test_baseline_cache_key_is_stable_and_sensitive_to_what_changes_the_result():
    protocol = protocol_config("ncfm", repeats=5).to_dict()
    key = baseline_cache_key("abc123", protocol, "convnet")
    assert re.fullmatch(r"full-convnet-[0-9a-f]{24}", key)
    assert baseline_cache_key("abc123", dict(protocol), "ConvNet") == key
    assert baseline_cache_key("abc123", {**protocol, "repeat_mode": "sequential"}, "convnet") == key
    changed = [
        baseline_cache_key("abc124", protocol, "convnet"),
        baseline_cache_key("abc123", protocol, "alexnet"),
        baseline_cache_key("abc123", {**protocol, "epochs": 301}, "convnet"),
        baseline_cache_key("abc123", {**protocol, "seed": 1}, "convnet"),
        baseline_cache_key("abc123", protocol_config("dsa", repeats=5).to_dict(), "convnet"),
    ]
    assert len({key, *changed}) == 6
    assert set(PROTOCOLS) == {"ncfm", "dsa", "quick"}


# --------------------------------------------------------------------------- the protocol learns


def test_convnet_on_ten_real_digits_per_class_beats_chance_clearly():
    digits = load_dataset("digits")
    images, labels = random_real_subset(digits, 10, seed=0)
    config = protocol_config("ncfm", epochs=30, repeats=1, width=32)
    result = evaluate_images(images, labels, digits, config, "cpu")
    assert result.runs[0] > 0.4, result.runs  # chance is 0.1
