from pathlib import Path

import pytest
import torch

from ncfm_core import augment, cf, store
from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.distill import Distiller, LoopHooks, checkpoint_due
from ncfm_core.errors import ConfigError, CorruptArtifactError
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.kernels import levers_of
from ncfm_core.pool import PoolSpec, train_pool
from ncfm_core.sampler import reverse_gradient
from ncfm_core.synset import decode_synset


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    base = decide_precisions(make_config(  # as a job's plan decides them: fp32 on the CPU
        "fake", 2, factor=2, width=8, pool_size=2, pool_epochs=1, pool_batch=16, real_per_class=10, num_freqs=32,
        iterations=6, seed=5,
    ), "cpu")
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
        psi_straight, psi_second = straight.matching.sampler.state_dict(), second.matching.sampler.state_dict()
        for name, a in psi_straight.items():
            assert torch.equal(a, psi_second[name]), name
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
        torch.testing.assert_close(
            whole.matching.sampler.log_scales, chunked.matching.sampler.log_scales, atol=1e-6, rtol=0
        )


def test_real_batches_are_per_class_and_distinct(tiny):
    dataset, base, pool = tiny
    d = Distiller(base.replace(real_per_class=5), dataset, pool, "cpu")
    index, labels = d.sample_real()
    assert index.shape == labels.shape == (15,)
    assert torch.equal(dataset.train_labels[index], labels)
    for c in range(3):
        assert len(set(index[labels == c].tolist())) == 5
    # asking more than a class holds (12 each here) draws each image once: the cap, not cycling
    d = Distiller(base.replace(real_per_class=20), dataset, pool, "cpu")
    index, labels = d.sample_real()
    assert d.real_per_class == 12 and index.shape == (36,)
    for c in range(3):
        assert sorted(index[labels == c].tolist()) == torch.nonzero(dataset.train_labels == c).flatten().tolist()


def _uneven(dataset):
    """``dataset`` with class 1 cut to 7 train images (the others keep 12)."""
    import dataclasses

    keep = torch.ones(len(dataset.train_labels), dtype=torch.bool)
    keep[torch.nonzero(dataset.train_labels == 1).flatten()[7:]] = False
    images, labels = dataset.train_images[keep], dataset.train_labels[keep]
    return dataclasses.replace(dataset, train_images=images, train_labels=labels)


def test_real_draw_is_capped_at_the_smallest_class_and_says_so(tiny):
    """Issue 14: a repeated real image under its class's one DSA draw is an identical feature
    (no information, half the real work at 1024/class on CIFAR's 500). Capped at the smallest
    class: every drawn image is distinct, every class draws the same number, and the cap is
    written once into ``notes`` for the job layer to log."""
    dataset, base, pool = tiny
    uneven = _uneven(dataset)
    d = Distiller(base.replace(real_per_class=10), uneven, pool, "cpu")
    assert d.real_per_class == 7
    assert len(d.notes) == 1 and "capped at 7 (asked 10)" in d.notes[0] and "'class_1'" in d.notes[0]
    for _ in range(3):
        index, labels = d.sample_real()
        assert index.shape == (21,)
        assert torch.equal(uneven.train_labels[index], labels)
        for c in range(3):
            assert len(set(index[labels == c].tolist())) == 7  # no duplicates
    assert Distiller(base.replace(real_per_class=7), uneven, pool, "cpu").notes == []


@pytest.mark.parametrize("sampler", [True, False])
def test_asking_more_than_a_class_holds_equals_asking_exactly_that(tiny, sampler):
    """The sampler draws one key per train image whatever the batch, so a run asking 20 per
    class (classes of 12) draws exactly the images of a run asking 12, and ends bit-identical."""
    dataset, base, pool = tiny
    over = Distiller(base.replace(sampler=sampler, real_per_class=20), dataset, pool, "cpu")
    exact = Distiller(base.replace(sampler=sampler, real_per_class=12), dataset, pool, "cpu")
    for _ in range(3):
        assert torch.equal(over.sample_real()[0], exact.sample_real()[0])
    over, exact = (Distiller(base.replace(sampler=sampler, real_per_class=n), dataset, pool, "cpu") for n in (20, 12))
    over.run(3)
    exact.run(3)
    assert torch.equal(over.images, exact.images)


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
    psi0 = [p.detach().clone() for p in d.matching.sampler.parameters()]
    d.run(4)
    assert not torch.equal(d.images, images0)
    assert any(not torch.equal(a, b) for a, b in zip(psi0, d.matching.sampler.parameters()))
    assert d.images.min() >= 0 and d.images.max() <= 1
    images, labels = d.synthetic_set()
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_mmd_matching_mode_runs_without_a_sampler(tiny):
    dataset, base, pool = tiny
    d = Distiller(base.replace(matching="mmd"), dataset, pool, "cpu")
    state = d.generator.get_state()
    d.matching.begin(d.generator)
    assert torch.equal(d.generator.get_state(), state)  # mean matching draws nothing
    m = d.step()
    assert m["match_loss"] >= 0 and d.matching.optimizers() == [] and d.sampler_tensors() == {}
    assert not hasattr(d.matching, "sampler") and "sampler" not in d.state_dict()


def test_progress_and_checkpoint_hooks(tiny):
    dataset, base, pool = tiny
    d = Distiller(base, dataset, pool, "cpu")
    events, saved = [], []
    hooks = LoopHooks(progress=events.append, checkpoint=lambda x: saved.append(x.iteration))
    assert d.run(5, checkpoint_every=2, hooks=hooks) is True
    assert [e["iteration"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["stage"] == "distill" and e["total"] == 5 for e in events)
    assert saved == [2, 4]  # not at the end: a run's end writes its results (and checkpoint) itself
    assert not d.mid_step


def test_a_stop_request_ends_the_loop_between_iterations(tiny):
    dataset, base, pool = tiny
    d = Distiller(base, dataset, pool, "cpu")
    asked = []

    def stop_after_two() -> bool:
        asked.append(d.iteration)
        return d.iteration >= 2

    assert d.run(6, hooks=LoopHooks(stop_requested=stop_after_two)) is False
    assert d.iteration == 2 and asked == [0, 1, 2] and not d.mid_step
    late = Distiller(base, dataset, pool, "cpu")  # a stop asked during the last iteration still counts
    assert late.run(1, hooks=LoopHooks(stop_requested=lambda: late.iteration == 1)) is False
    assert late.iteration == 1


@pytest.mark.parametrize(
    ("iteration", "target", "every", "due"),
    [(2, 6, 2, True), (6, 6, 2, False), (3, 6, 2, False), (4, 6, 0, False), (100, 250, 100, True),
     (200, 200, 100, False)],
)
def test_checkpoint_rule(iteration, target, every, due):
    assert checkpoint_due(iteration, target, every) is due


# -- one engine step against the whole loss as one autograd graph ----------------------------


def _reference_step_grads(d: Distiller) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and gradients computed the plain way: every class in one forward, the real
    CF through autograd, psi's gradient reversed in the graph. Draws the same random numbers in
    the same order as Distiller.step (member, beta, real batch, augmentation, frequencies)."""
    config, gen = d.config, d.generator
    member = int(torch.randint(len(d.pool), (1,), generator=gen))
    beta = float(torch.rand((), generator=gen))
    d.pool.blend_into(d.extractor, member, beta)
    d.pool.load_trained_into(d.teacher, member)
    index, labels = d.sample_real()
    params = augment.sample_params(config.dsa_strategy, d.num_classes, d.image_size, gen, allow_flip=d.allow_flip)
    freqs = d.matching.sampler.sample(gen)
    if d.matching.learned:
        freqs = reverse_gradient(freqs)
    with torch.no_grad():
        x = augment.apply_params(d.real_images[index].float() / 255, labels, params)
        real = cf.normalize_features(d.extractor.features(x))
    decoded, syn_labels = decode_synset(d.images, d.labels, config.factor)
    syn_input = augment.apply_params(decoded, syn_labels, params)
    syn = cf.normalize_features(d.extractor.features(syn_input))
    per_class = cf.ncfd(
        *cf.cf_embed_per_class(real, labels, freqs, d.num_classes),
        *cf.cf_embed_per_class(syn, syn_labels, freqs, d.num_classes),
        alpha=config.alpha,
    )
    loss = config.loss_scale * per_class.sum() + config.calib_weight * torch.nn.functional.cross_entropy(
        d.teacher(syn_input), syn_labels
    )
    loss.backward()
    sampler_grads = {n: p.grad.clone() for n, p in d.matching.sampler.named_parameters()}
    return float(loss.detach()), d.images.grad.clone(), sampler_grads


@pytest.mark.parametrize("sampler", [True, False])
@pytest.mark.parametrize(
    "plan",
    [dict(), dict(class_chunk=1, real_chunk=7), dict(class_chunk=2, real_chunk=4, activation_checkpointing=True)],
)
def test_step_gradients_equal_a_single_graph_reference(tiny, sampler, plan):
    dataset, base, pool = tiny
    config = base.replace(sampler=sampler, **plan)
    reference = Distiller(config, dataset, pool, "cpu")
    ref_loss, ref_image_grad, ref_sampler_grads = _reference_step_grads(reference)
    engine = Distiller(config, dataset, pool, "cpu")
    metrics = engine.step()
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    # float32 rounding only: real features computed in chunks of another batch size differ in the
    # last bits, and sqrt in the NCFD amplifies that near zero; 1e-4 of the largest entry.
    image_tolerance = 1e-4 * float(ref_image_grad.abs().max())
    torch.testing.assert_close(engine.images.grad, ref_image_grad, atol=image_tolerance, rtol=0)
    # On the first step psi's mixture logits get a zero gradient up to rounding (all components
    # start equal), so the sampler's tolerance is set by its largest gradient overall.
    scale = max((float(g.abs().max()) for g in ref_sampler_grads.values()), default=0.0)
    for name, param in engine.matching.sampler.named_parameters():
        torch.testing.assert_close(param.grad, ref_sampler_grads[name], atol=1e-4 * scale, rtol=0, msg=name)
    if sampler:  # psi really gets the reversed gradient of its scales
        assert ref_sampler_grads["log_scales"].abs().sum() > 0


@pytest.mark.parametrize(
    "plan", [dict(class_chunk=2, activation_checkpointing=True, real_chunk=7), dict(precision="bf16")]
)
def test_resume_is_bit_identical_with_chunks_checkpointing_and_precision(tiny, tmp_path, plan):
    dataset, base, pool = tiny
    config = base.replace(**plan)
    straight = Distiller(config, dataset, pool, "cpu")
    straight.run(5)
    first = Distiller(config, dataset, pool, "cpu")
    first.run(2)
    store.save_state(tmp_path / "s.safetensors", first.state_dict())
    second = Distiller(config, dataset, pool, "cpu")
    second.load_state_dict(store.load_state(tmp_path / "s.safetensors"))
    second.run(5)
    assert torch.equal(second.images, straight.images)


def test_deferred_loss_reads_resume_exactly_and_keep_the_curve(tiny, tmp_path):
    """The accelerator path (losses read back every few iterations) on CPU: a checkpoint taken
    with unread losses resumes to the same images, scheduler inputs and loss curve."""
    dataset, base, pool = tiny
    config = base.replace(sampler=False)

    def make(sync_every):
        d = Distiller(config, dataset, pool, "cpu")
        d._sync_every = sync_every
        return d

    every_step = make(1)
    every_step.run(12)
    straight = make(4)
    straight.run(12)
    first = make(4)
    first.run(6)  # two losses unread
    assert len(first.pending_losses) == 2
    store.save_state(tmp_path / "s.safetensors", first.state_dict())
    second = make(4)
    second.load_state_dict(store.load_state(tmp_path / "s.safetensors"))
    second.run(12)
    assert torch.equal(second.images, straight.images)
    assert second.loss_curve == straight.loss_curve == every_step.loss_curve
    assert straight.step()["loss_iteration"] == 12  # 13 is not read yet: the metrics say so


# -- hot-path levers of issue 14: each equals the plain step on CPU ---------------------------


@pytest.mark.parametrize("plan", [{}, {"activation_checkpointing": True, "real_chunk": 7, "class_chunk": 2}])
def test_inference_mode_real_side_is_bit_identical_to_no_grad(tiny, plan):
    """The real side runs under torch.inference_mode; the same arithmetic as under no_grad, so
    the same bits (psi on: its closed-form gradient reads the kept or recomputed features)."""
    dataset, base, pool = tiny
    config = base.replace(**plan)
    lever = Distiller(config, dataset, pool, "cpu")
    assert lever._real_side_mode is torch.inference_mode
    lever.run(3)
    plain = Distiller(config, dataset, pool, "cpu")
    plain._real_side_mode = torch.no_grad  # what ran before issue 14
    plain.run(3)
    assert torch.equal(lever.images, plain.images)
    psi_lever, psi_plain = lever.matching.sampler.parameters(), plain.matching.sampler.parameters()
    assert all(torch.equal(a, b) for a, b in zip(psi_lever, psi_plain))


def test_tf32_cf_precision_changes_nothing_on_cpu(tiny):
    """cf_precision tf32 is a CUDA lever: on CPU the run is the fp32 run, bit for bit."""
    dataset, base, pool = tiny
    runs = []
    for cf_precision in ("fp32", "tf32"):  # tf32 handed to the loop as it is: CPU tensors project in fp32
        d = Distiller(base.replace(cf_precision=cf_precision), dataset, pool, "cpu")
        assert d.cf_precision == cf_precision
        d.run(3)
        runs.append(d.images.detach())
    assert torch.equal(runs[0], runs[1])
    for asked in ("tf32", "auto"):  # what a job's plan hands the loop on the CPU
        assert decide_precisions(base.replace(cf_precision=asked), "cpu").cf_precision == "fp32"


# -- checkpoints of earlier versions ----------------------------------------------------------

OLD_CHECKPOINT = Path(__file__).parent / "data" / "distill_state_aa11a6b_psi.safetensors"


def test_a_checkpoint_written_before_the_losses_were_strategies_resumes(tiny):
    """The checkpoint of the ``tiny`` run with psi after 3 of 6 iterations, as commit aa11a6b
    (before issue 21 made the matching losses strategies) wrote it: ``tools/compare_runs.py REF
    --steps 6 --keep DIR`` with REF at aa11a6b, DIR/reference/0.middle.safetensors. It loads into
    today's Distiller with nothing lost (saving it again gives every tensor back, bit for bit)
    and continues. That the continuation equals aa11a6b's own run bit for bit is what
    compare_runs shows (its "resumed" column); here the pool is retrained on this machine."""
    dataset, base, pool = tiny
    state = store.load_state(OLD_CHECKPOINT)
    assert state["iteration"] == 3 and {"sampler", "sampler_optimizer"} <= state.keys()
    d = Distiller(base, dataset, pool, "cpu")
    d.load_state_dict(state)
    old_tensors, old_tree = store.flatten_state(state)
    new_tensors, new_tree = store.flatten_state(d.state_dict())
    assert new_tree == old_tree  # every key, number and string where it was
    assert new_tensors.keys() == old_tensors.keys() and len(old_tensors) == 13
    for key, tensor in old_tensors.items():
        assert torch.equal(new_tensors[key], tensor), key
    psi = d.matching.sampler.log_scales.detach().clone()
    d.run(6)
    assert d.iteration == 6 and torch.isfinite(d.images).all()
    assert not torch.equal(d.matching.sampler.log_scales, psi)  # psi kept learning from its loaded state


# -- the kernel levers in the loop (ncfm_core.kernels) ---------------------------------------------------

# Distilled images after 3 iterations (psi and calibration on) against today's path, worst
# measured: fp32 pool=reshape 1.1e-6, norm=batchnorm 3.5e-6, layout=nhwc 3.4e-6, all of them
# 3.1e-6; bf16 norm=batchnorm 8.2e-6; every other lever (and the rest in bf16) 0. One Adam step
# moves a pixel by the learning rate, 1e-2: a lever that computed something else would show.
LEVER_TOLERANCE = 5e-5
BIT_FOR_BIT = ("pool=broadcast", "casts=once")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kernels", ["pool=broadcast", "pool=reshape", "norm=batchnorm", "casts=once", "layout=nhwc",
                                     "pool=broadcast,norm=batchnorm,casts=once,layout=nhwc"])
def test_each_kernel_lever_distills_todays_images(tiny, precision, kernels):
    """The config's kernels option reaches the loop (decided levers, switched modules, memory
    format, weight dtypes) and the images are today's: bit for bit where the maths is the same
    (the broadcast pool; casts=once, whose blend rounds the fp32 weights once as autocast did),
    else within LEVER_TOLERANCE. (compile and graphs: tests/test_forward.py, test_graphs.py.)"""
    dataset, base, pool = tiny
    today = Distiller(base.replace(precision=precision), dataset, pool, "cpu")
    lever = Distiller(base.replace(precision=precision, kernels=kernels), dataset, pool, "cpu")
    levers = lever.levers
    assert levers.describe() == kernels and levers_of(lever.extractor) == levers_of(lever.teacher)
    assert levers_of(lever.extractor).pool == levers.pool and levers_of(lever.extractor).norm == levers.norm
    layout = torch.channels_last if levers.layout == "nhwc" else torch.contiguous_format
    conv = lever.extractor.blocks[0].conv.weight
    assert conv.is_contiguous(memory_format=layout)
    low = precision == "bf16" and levers.casts == "once"
    assert conv.dtype == lever.teacher.classifier.weight.dtype == (torch.bfloat16 if low else torch.float32)
    assert lever.extractor.blocks[0].norm.weight.dtype == torch.float32  # autocast keeps norms fp32: so do we
    today.run(3)
    lever.run(3)
    if kernels in BIT_FOR_BIT:
        assert torch.equal(lever.images, today.images)
    else:
        torch.testing.assert_close(lever.images, today.images, rtol=0, atol=LEVER_TOLERANCE)
    # no parameter of the frozen networks ever takes a gradient, whatever the levers
    for net in (lever.extractor, lever.teacher):
        assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_a_distiller_refuses_undecided_kernels(tiny):
    dataset, base, pool = tiny
    with pytest.raises(ConfigError, match="Distiller was given kernels 'auto'"):
        Distiller(base.replace(kernels="auto"), dataset, pool, "cpu")


def test_casts_once_blends_the_weights_into_the_compute_dtype_once_per_iteration(tiny):
    """casts=once under bf16: the extractor's convolution and linear weights are bf16 tensors the
    pool's blend writes in place (the fp32 blend rounded once, exactly autocast's cast of it);
    the forward then makes no weight casts at all, and features reach the matching maths in one
    cast (bf16 -> fp32), never a round trip."""
    dataset, base, pool = tiny
    config = base.replace(precision="bf16", kernels="casts=once")
    once, today = Distiller(config, dataset, pool, "cpu"), Distiller(base.replace(precision="bf16"), dataset, pool, "cpu")
    weights = {name: p for name, p in once.extractor.named_parameters()}
    pool.blend_into(once.extractor, 1, 0.3)
    pool.blend_into(today.extractor, 1, 0.3)
    for name, param in today.extractor.named_parameters():
        assert weights[name] is dict(once.extractor.named_parameters())[name]  # written in place
        if ".conv." in name or "classifier" in name:
            assert torch.equal(weights[name], param.to(torch.bfloat16))
        else:
            assert torch.equal(weights[name], param)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    casts = {}
    for name, distiller in (("once", once), ("today", today)):
        with CastCounter() as counter:
            raw = distiller.forward.raw_features(distiller.extractor, images, grad=False)
            distiller.forward.embed(raw)
        casts[name] = counter.casts
    convs = len(once.extractor.blocks)
    assert len(casts["today"]) - len(casts["once"]) == 2 * convs  # each convolution's weight and bias
    assert casts["once"][-1] == (torch.bfloat16, torch.float32)  # the features, once, to the maths' dtype
    assert sum(1 for cast in casts["once"] if cast == (torch.float32, torch.bfloat16)) == 1  # the image, once


class CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """(from dtype, to dtype) of every dtype conversion the ops inside make."""

    def __enter__(self):
        self.casts = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and out.dtype != args[0].dtype:
            self.casts.append((args[0].dtype, out.dtype))
        return out
