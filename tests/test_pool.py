import pytest
import torch

from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.errors import CorruptArtifactError
from ncfm_core.pool import Pool, PoolSpec, load_or_train_pool, train_pool


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=10, test_per_class=4)
    config = make_config("fake", 1, pool_size=2, pool_epochs=1, width=8, pool_batch=16)
    spec = PoolSpec.from_config(config, dataset)
    return dataset, spec, train_pool(spec, dataset, "cpu")


def test_blend_is_the_convex_combination(tiny):
    _, spec, pool = tiny
    module = spec.build()
    for beta in (0.0, 0.3, 1.0):
        pool.blend_into(module, 1, beta)
        for name, value in module.state_dict().items():
            init, trained = pool.init_states[1][name], pool.trained_states[1][name]
            torch.testing.assert_close(value, beta * init + (1 - beta) * trained, atol=1e-6, rtol=1e-6)


def test_members_differ_and_training_moved_the_weights(tiny):
    _, _, pool = tiny
    name = max(pool.trained_states[0], key=lambda k: pool.trained_states[0][k].numel())  # a conv weight
    assert not torch.equal(pool.init_states[0][name], pool.init_states[1][name])
    assert not torch.equal(pool.init_states[0][name], pool.trained_states[0][name])


def test_training_is_reproducible_and_leaves_global_rng_alone(tiny):
    dataset, spec, pool = tiny
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = train_pool(spec, dataset, "cpu")
    after = torch.rand(1)
    assert torch.equal(before, after)
    for a, b in zip(pool.trained_states, again.trained_states):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_round_trip_and_spec_mismatch(tiny, tmp_path):
    dataset, spec, pool = tiny
    loaded, cached = load_or_train_pool(spec, dataset, "cpu", cache_dir=tmp_path)
    assert not cached
    reloaded, cached = load_or_train_pool(spec, dataset, "cpu", cache_dir=tmp_path)
    assert cached
    for a, b in zip(pool.trained_states + pool.init_states, reloaded.trained_states + reloaded.init_states):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = PoolSpec(**{**spec.__dict__, "seed": spec.seed + 1})
    with pytest.raises(CorruptArtifactError, match="pool.safetensors"):
        Pool.load(tmp_path / "pool.safetensors", other)


def test_pool_key_changes_with_training_settings(tiny):
    _, spec, _ = tiny
    assert spec.key() == PoolSpec(**spec.__dict__).key()
    assert spec.key() != PoolSpec(**{**spec.__dict__, "epochs": spec.epochs + 1}).key()


@pytest.mark.parametrize("network, width_seen, depth_seen", [
    ("convnet", 8, 2), ("convnet3", 8, 3), ("convnet_bn", 8, 2), ("alexnet", None, None),
])
def test_spec_build_honours_the_knobs_each_network_has(network, width_seen, depth_seen):
    """--width 8 reaches every ConvNet variant (it used to reach only the plain one)."""
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=16, train_per_class=2, test_per_class=1)
    config = make_config("fake", 1, network=network, width=8, depth=2)
    net = PoolSpec.from_config(config, dataset).build()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    if width_seen is None:
        assert convs[0].out_channels != 8  # AlexNet has fixed widths
        return
    assert {c.out_channels for c in convs} == {width_seen}
    assert len(convs) == depth_seen


def test_key_changes_with_the_pool_format(tiny, monkeypatch):
    """A pool built by an older build rule lives under another key: it is retrained, not misread."""
    from ncfm_core import pool as pool_module

    _, spec, _ = tiny
    before = spec.key()
    monkeypatch.setattr(pool_module, "POOL_FORMAT_VERSION", pool_module.POOL_FORMAT_VERSION + 1)
    assert spec.key() != before
