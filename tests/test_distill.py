import pytest
import torch

from ncfm_core import cf, store
from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.distill import Distiller
from ncfm_core.errors import CorruptArtifactError
from ncfm_core.pool import PoolSpec, train_pool


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    base = make_config(
        "fake", 2, factor=2, width=8, pool_size=2, pool_epochs=1, pool_batch=16, real_per_class=10, num_freqs=32,
        iterations=6, seed=5,
    )
    pool = train_pool(PoolSpec.from_config(base, dataset), dataset, "cpu")
    return dataset, base, pool


@pytest.mark.parametrize("sampler", [True, False])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny, tmp_path, sampler):
    dataset, base, pool = tiny
    config = base.replace(sampler=sampler)
    straight = Distiller(config, dataset, pool, "cpu")
    straight.run(6)

    first = Distiller(config, dataset, pool, "cpu")
    first.run(3)
    path = tmp_path / "state.safetensors"
    store.save_state(path, first.state_dict())  # through the real on-disk format
    second = Distiller(config, dataset, pool, "cpu")
    second.load_state_dict(store.load_state(path))
    assert second.iteration == 3
    second.run(6)
    assert torch.equal(second.images, straight.images)
    if sampler:
        for (name, a), b in zip(straight.sampler.state_dict().items(), second.sampler.state_dict().values()):
            assert torch.equal(a, b), name
    # and a fresh run from scratch with the same seed is the same too
    assert torch.equal(Distiller(config, dataset, pool, "cpu").images, Distiller(config, dataset, pool, "cpu").images)


def test_state_from_another_shape_is_refused(tiny):
    dataset, base, pool = tiny
    state = Distiller(base, dataset, pool, "cpu").state_dict()
    other = Distiller(base.replace(ipc=1), dataset, pool, "cpu")
    with pytest.raises(CorruptArtifactError, match="shape"):
        other.load_state_dict(state)


@pytest.mark.parametrize("sampler", [True, False])
def test_real_chunking_does_not_change_the_step(tiny, sampler):
    dataset, base, pool = tiny
    whole = Distiller(base.replace(sampler=sampler, real_chunk=10_000), dataset, pool, "cpu")
    chunked = Distiller(base.replace(sampler=sampler, real_chunk=7), dataset, pool, "cpu")
    m1, m2 = whole.step(), chunked.step()
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(whole.images, chunked.images, atol=1e-6, rtol=0)
    if sampler:
        # log_scales only: on the first step every component is identical, so the mixture
        # logits' gradient is zero up to rounding, and Adam turns rounding into a full step.
        torch.testing.assert_close(whole.sampler.log_scales, chunked.sampler.log_scales, atol=1e-6, rtol=0)


def test_real_batches_are_per_class_and_distinct(tiny):
    dataset, base, pool = tiny
    d = Distiller(base.replace(real_per_class=5), dataset, pool, "cpu")
    index, labels = d._sample_real()
    assert index.shape == labels.shape == (15,)
    assert torch.equal(dataset.train_labels[index], labels)
    for c in range(3):
        assert len(set(index[labels == c].tolist())) == 5
    # a class smaller than the batch is used whole before anything repeats
    d = Distiller(base.replace(real_per_class=20), dataset, pool, "cpu")
    index, labels = d._sample_real()
    assert set(index[labels == 0][:12].tolist()) == set(torch.nonzero(dataset.train_labels == 0).flatten().tolist())


def test_fused_loss_equals_a_per_class_loop(tiny):
    """The batched per-class NCFD equals computing each class on its own."""
    dataset, base, pool = tiny
    gen = torch.Generator().manual_seed(0)
    real, real_labels = torch.randn(30, 6, generator=gen), torch.arange(3).repeat_interleave(10)
    syn, syn_labels = torch.randn(12, 6, generator=gen), torch.arange(3).repeat_interleave(4)
    freqs = torch.randn(16, 6, generator=gen)
    fused = cf.ncfd(
        *cf.cf_embed_per_class(real, real_labels, freqs, 3), *cf.cf_embed_per_class(syn, syn_labels, freqs, 3)
    )
    for c in range(3):
        loop = cf.ncfd(*cf.cf_embed(real[real_labels == c], freqs), *cf.cf_embed(syn[syn_labels == c], freqs))
        torch.testing.assert_close(fused[c], loop, atol=1e-6, rtol=1e-6)


def test_psi_moves_images_move_and_pixels_stay_in_range(tiny):
    dataset, base, pool = tiny
    d = Distiller(base, dataset, pool, "cpu")
    images0 = d.images.detach().clone()
    psi0 = [p.detach().clone() for p in d.sampler.parameters()]
    d.run(4)
    assert not torch.equal(d.images, images0)
    assert any(not torch.equal(a, b) for a, b in zip(psi0, d.sampler.parameters()))
    assert d.images.min() >= 0 and d.images.max() <= 1
    images, labels = d.synthetic_set()
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_mmd_matching_mode_runs_without_a_sampler(tiny):
    dataset, base, pool = tiny
    d = Distiller(base.replace(matching="mmd"), dataset, pool, "cpu")
    m = d.step()
    assert m["match_loss"] >= 0 and not d.learned_sampler and d.sampler_tensors() == {}


def test_callback_and_checkpoint_hooks(tiny):
    dataset, base, pool = tiny
    d = Distiller(base, dataset, pool, "cpu")
    events, saved = [], []
    d.run(4, callback=events.append, on_checkpoint=lambda x: saved.append(x.iteration), checkpoint_every=2)
    assert [e["iteration"] for e in events] == [1, 2, 3, 4]
    assert all(e["stage"] == "distill" and e["total"] == 4 for e in events)
    assert saved == [2, 4]
