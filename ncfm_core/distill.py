"""The distillation loop, fused over classes, with an exact, resumable state.

One iteration (:meth:`Distiller.step`); what is matched is the config's registered matching loss
(``ncfm_core.matching``: ``ncfm``, the characteristic-function discrepancy with psi or Gaussian
frequencies; ``mmd``, mean matching; ...), which owns its sampler, statistics and terms:

1. ``_draw``: a pool member and ``beta ~ U(0, 1)`` blended into the extractor in place;
   ``real_per_class`` real images of every class (capped at the smallest class: never a
   duplicate; one vectorised op); one DSA draw per class (shared by the real and the synthetic
   images of that class); then the loss's own random numbers (the frequencies);
2. ``_real_side``: real features, no grad, chunk by chunk (memory bounded by the chunk), from
   which the loss accumulates its per-class statistics in float64;
3. ``_synthetic_groups``: ``class_chunk`` classes at a time, decode the multi-formation images,
   augment, one forward, the loss per class (plus the calibration cross-entropy) and a backward.
   The loss is a sum over classes and the real statistics do not depend on the synthetic side,
   so the groups' gradients add up to the gradient of the whole loss;
4. ``_sampler_backward``: a learned sampler's gradient (psi: through the real CF in closed
   form, then ONE backward with the sign reversed: psi ascends what the images descend);
5. ``_optimizer_step``: one step of each optimiser; clamp pixels to [0, 1].

Every random number comes from one generator whose state is part of :meth:`state_dict`, so a run
continued from a saved state ends with exactly the images of an uninterrupted run (on CPU).

Precision: with bf16/fp16 only the network forwards run under autocast. Features are cast to
float32 before the matching maths, which always run in float32: ``<t, f>`` reaches tens of radians
once psi scales the frequencies up (scales up to 20), and bf16 keeps 8 bits of mantissa, so at
|x| ~ 32 neighbouring bf16 values are 0.25 rad apart and cos/sin of such an argument is noise.
On CUDA the projections ``<t, f>`` run on TF32 tensor cores by default (``cf_precision``, fp32
inputs rounded to 10 mantissa bits, fp32 sums and outputs: a typical phase error of ~2^-11 x the
frequency scale, see ``ncfm_core.cf``); on CPU they stay fp32, bit for bit.

The real side runs in inference mode: its features are never part of an autograd graph.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ncfm_core import augment, cf
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset
from ncfm_core.devices import decided_precisions
from ncfm_core.errors import ConfigError
from ncfm_core.forward import LoopForward, loop_network
from ncfm_core.kernels import decided_levers, levers_for_plan
from ncfm_core.loop_state import load_loop_state, loop_state
from ncfm_core.matching import MatchingLoss, RealSide, matching_class
from ncfm_core.pool import Pool
from ncfm_core.real_batches import RealBatches
from ncfm_core.retry import OutOfMemoryHook, run_iteration
from ncfm_core.synset import check_factor, init_synset

ProgressCallback = Callable[[dict[str, Any]], None]

DEFAULT_REAL_CHUNK = 2048
LOSS_LOG_EVERY = 10  # iterations per point of the stored loss curve


def checkpoint_due(iteration: int, target: int, every: int) -> bool:
    """The checkpoint rule, written once: after every ``every``-th iteration short of ``target``
    (the end of a run writes its results, and its checkpoint with them, separately). Under
    torchrun every rank gathers its shard exactly where this is true (and at ``target``), so
    ranks that disagreed on it would deadlock. ``every`` 0: never."""
    return every > 0 and iteration % every == 0 and iteration < target


@dataclass(frozen=True)
class LoopHooks:
    """What a job hooks into :meth:`Distiller.run`: ``progress(event)`` after each iteration,
    ``checkpoint(distiller)`` where :func:`checkpoint_due`, ``stop_requested()`` between
    iterations (Ctrl-C, SIGTERM), ``out_of_memory(distiller, event)`` for an iteration that ran
    out of memory, rolled back (``ncfm_core.retry``: True, the distiller switched to a smaller
    plan, runs it again; False stops). Any may be None (an out-of-memory error then ends the loop)."""

    progress: ProgressCallback | None = None
    checkpoint: Callable[[Distiller], None] | None = None
    stop_requested: Callable[[], bool] | None = None
    out_of_memory: OutOfMemoryHook | None = None


class Distiller:
    """Holds the synthetic images and their optimiser, the matching loss (``self.matching``, with
    its sampler and that sampler's optimiser, if any) and the run's generator.

    ``dataset`` is moved to ``device`` once; nothing is read from disk inside :meth:`step`.
    Memory/speed options come from the config: ``real_chunk``, ``class_chunk``, ``precision``,
    ``activation_checkpointing`` (see ``ncfm_core.planner``) and the kernel levers ``kernels``
    (``ncfm_core.kernels``), all decided by the plan.

    Several processes (``ncfm_core.parallel``): ``classes`` is the contiguous block of class
    ids this process owns (default all). Every process draws the SAME random numbers for all
    classes (so generator states stay identical) and keeps only its block's rows: ``images``,
    ``labels`` and the image optimiser cover the block, the real side reads only its classes.
    ``all_reduce(t)`` sums ``t`` in place over the processes; it is applied to the loss totals
    and (by the loss) to a learned sampler's gradient, so psi, the scheduler and the loss curve
    stay identical everywhere. :meth:`load_state_dict` accepts a whole-set state and keeps the block's rows.
    """

    def __init__(self, config: DistillConfig, dataset: ImageDataset, pool: Pool, device: torch.device | str,
                 *, classes: range | None = None, all_reduce: Callable[[Tensor], None] | None = None):
        self.config = config
        self.device = torch.device(device)
        self.num_classes = dataset.num_classes
        self.image_size = dataset.image_size
        self.allow_flip = dataset.allow_flip
        check_factor(self.image_size, config.factor)
        augment.parse_strategy(config.dsa_strategy, allow_flip=self.allow_flip)

        self.real_images = dataset.train_images.to(self.device)  # uint8 (N, C, H, W)
        class_indices = dataset.class_indices()
        self.classes = range(self.num_classes) if classes is None else classes
        if self.classes.step != 1 or not 0 <= self.classes.start < self.classes.stop <= self.num_classes:
            raise ConfigError(f"classes {self.classes} is not a non-empty block of 0..{self.num_classes - 1}")
        self.real_batches = RealBatches(class_indices, dataset.class_names, config.real_per_class, self.classes,
                                        self.device)
        self.real_per_class = self.real_batches.per_class  # capped at the smallest class
        self.notes = list(self.real_batches.notes)  # one-line facts about this run, for the job layer to log once

        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Member and blend weight drive Python-side choices (which weights to blend): drawing them
        # from a CPU generator avoids a host sync per iteration on accelerators. On CPU it is the
        # run's generator itself, so CPU runs draw exactly one stream.
        self.host_generator = (
            self.generator if self.device.type == "cpu" else torch.Generator().manual_seed(config.seed + 7919)
        )
        images, self.labels = init_synset(self.real_images, [idx.to(self.device) for idx in class_indices],
                                          config.ipc, config.factor, config.init, self.generator)
        self._all_reduce = all_reduce
        owned_rows = slice(self.classes.start * config.ipc, self.classes.stop * config.ipc)
        images, self.labels = images[owned_rows], self.labels[owned_rows]
        self.images = images.detach().clone().requires_grad_(True)  # stored form, (C*ipc, C, H, W)
        # No weight decay on pixels: decay would pull every image towards black.
        self.image_optimizer = torch.optim.AdamW([self.images], lr=config.image_lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.image_optimizer, mode="min", factor=0.5, patience=config.lr_patience
        )

        self.precision, self.cf_precision = decided_precisions(config, "Distiller")  # the plan decided them
        self.levers = decided_levers(config.kernels, "Distiller")  # the kernel levers, decided by the plan too
        # The real side's autograd mode: inference mode (no version counters, no view tracking);
        # torch.no_grad gives the same bits (tests/test_distill.py) and is what ran before.
        self._real_side_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode
        self.channels_last = self.levers.layout == "nhwc"
        self.pool = pool.to(self.device)
        self.extractor = loop_network(pool.spec, self.levers, self.device, self.precision)
        self.teacher = loop_network(pool.spec, self.levers, self.device, self.precision)
        feature_dim = self.extractor.feature_dim
        # fp16 gradients through the network underflow without loss scaling; bf16 has fp32's range.
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.compile_seconds: float | None = None  # the compile lever's seconds (None: nothing compiled)
        self._cut(config.real_chunk or DEFAULT_REAL_CHUNK, config.class_chunk or len(self.classes),
                  bool(config.activation_checkpointing))

        # The loss owns its sampler (learned psi, Gaussian or none) and that sampler's optimiser.
        self.matching: MatchingLoss = matching_class(config.matching)(
            config, feature_dim=feature_dim, device=self.device, cf_precision=self.cf_precision
        )
        self.iteration = 0
        self.phase = "between iterations"  # the phase step() is in, named by an out-of-memory event
        self.mid_step = False  # True while run() is inside step(): the state is then not one to keep
        self.loss_curve: list[list[float]] = []  # [iteration, mean loss over the last LOSS_LOG_EVERY]
        self.loss_window: list[float] = []
        # Reading a loss on the host waits for the device. On accelerators the per-iteration
        # losses stay on the device and are read every LOSS_LOG_EVERY iterations (aligned to the
        # iteration count, so a resumed run reads them at the same points); on CPU every step.
        self._sync_every = 1 if self.device.type == "cpu" else LOSS_LOG_EVERY
        self.pending_losses: list[Tensor] = []  # per unread iteration: (loss, match, calib) on device
        self._last: dict[str, float | int | None] = {
            "loss": None, "match_loss": None, "calib_loss": None, "loss_iteration": 0,
        }

    def use_plan(self, real_chunk: int, class_chunk: int, activation_checkpointing: bool) -> None:
        """Cut the coming iterations as a plan says (real images per no-grad forward, classes per
        synthetic pass, checkpointing): the same maths, only the order of floating-point sums may
        change; ``config`` says so from then on (with checkpointing, the kernel levers that do not
        run under it, compile and graphs, recorded off). Between iterations (``ncfm_core.retry``)."""
        self.config = self.config.replace(
            real_chunk=real_chunk, class_chunk=class_chunk, activation_checkpointing=activation_checkpointing,
            kernels=levers_for_plan(self.levers, activation_checkpointing).spec())
        self._cut(real_chunk, class_chunk, activation_checkpointing)

    def _cut(self, real_chunk: int, class_chunk: int, activation_checkpointing: bool) -> None:
        """The plan's knobs in force: the real chunks' bounds, the class groups, and the forwards
        (compiled for these shapes when the compile lever is on: a smaller plan compiles again)."""
        self.real_chunk, self.class_chunk = real_chunk, min(class_chunk, len(self.classes))
        self._real_bounds = cf.chunk_bounds(len(self.classes), self.real_per_class, real_chunk)
        self.checkpointing = activation_checkpointing
        self.forward = LoopForward(
            (self.extractor, self.teacher), device_type=self.device.type, precision=self.precision,
            checkpointing=self.checkpointing, levers=self.levers, normalize=self.config.normalize_features,
        )
        # The compile lever: the blocks compiled for the plan's shapes now, not inside the first
        # iterations, so the seconds per iteration exclude it (the job's time to a result does not).
        seconds = self._compile_blocks()
        if seconds is not None:
            self.compile_seconds = (self.compile_seconds or 0.0) + seconds

    def _compile_blocks(self) -> float | None:
        """Compile the networks' blocks for this plan's shapes (the compile lever; None when it is
        off, or failed: the blocks then run eagerly, after one warning)."""
        decoded, owned = self.config.ipc * self.config.factor**2, len(self.classes)
        groups = [min(self.class_chunk, owned - first) * decoded for first in range(0, owned, self.class_chunk)]
        seconds = self.forward.compile_blocks(
            self.extractor, self.teacher if self.config.calib_weight > 0 else None,
            tuple(self.real_images.shape[1:]), [end - start for start, end in self._real_bounds], groups,
            self._real_side_mode,
        )
        if seconds is not None:
            self.notes.append(f"compiled the networks' blocks for this plan's shapes in {seconds:.1f} s, before "
                              "the first iteration (not in the seconds per iteration)")
        return seconds

    # -- one iteration ---------------------------------------------------------------------
    def sample_real(self) -> tuple[Tensor, Tensor]:
        """``self.real_per_class`` distinct indices of every owned class and their labels, each
        (C*B,) class-major (:meth:`RealBatches.draw`)."""
        return self.real_batches.draw(self.generator), self.real_batches.labels

    def _real_chunk_features(self, index: Tensor, start: int, end: int, params: dict[str, Tensor]) -> Tensor:
        """Normalised features (end - start, d) of real rows [start, end), computed in inference
        mode (no autograd bookkeeping at all: no version counters, no views tracked). They are
        inference tensors: only ever read under no_grad (the CF sums, psi's closed-form
        gradient), never saved for a backward."""
        with self._real_side_mode():
            return self.forward.real_features(self.extractor, self.real_images, index[start:end],
                                              self.real_batches.labels[start:end], params)

    def _group_loss(self, images: Tensor, first_class: int, params: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, match, calibration) of one group of classes; ``images`` are its stored images."""
        config = self.config
        k = images.shape[0] // config.ipc
        labels = self.labels[first_class * config.ipc : (first_class + k) * config.ipc]
        teacher = self.teacher if config.calib_weight > 0 else None
        features, syn_labels, teacher_raw = self.forward.synthetic_features(
            self.extractor, teacher, images, labels, params, config.factor)
        rows_per_class = config.ipc * config.factor**2  # (k * rows_per_class, d) features, class-major
        per_class = self.matching.group_loss(features, slice(first_class, first_class + k), rows_per_class)
        match = config.loss_scale * per_class.sum()
        calib = torch.zeros((), device=self.device)
        if config.calib_weight > 0:
            with self.forward.autocast():
                logits = self.teacher.classifier(teacher_raw)
            # a sum over the group / all synthetic images (of every process): the groups add up to the full mean
            total = self.num_classes * rows_per_class
            calib = config.calib_weight * F.cross_entropy(logits.float(), syn_labels, reduction="sum") / total
        return match + calib, match, calib

    def _backward(self, loss: Tensor) -> None:
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def _draw(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The iteration's random choices, in the run's fixed order: pool member and blend weight
        (blended into the extractor), real images, one augmentation per class, then the loss's own
        (its frequencies). Returns the real indices and the augmentation parameters."""
        config, host = self.config, self.host_generator
        member = int(torch.randint(len(self.pool), (1,), generator=host, device=host.device))
        beta = float(torch.rand((), generator=host, device=host.device))
        self.pool.blend_into(self.extractor, member, beta)
        if config.calib_weight > 0:
            self.pool.load_trained_into(self.teacher, member)
        real_index, _ = self.sample_real()
        params = augment.sample_params(
            config.dsa_strategy, self.num_classes, self.image_size, self.generator, allow_flip=self.allow_flip
        )
        self.matching.begin(self.generator)
        return real_index, {k: v.to(self.device) for k, v in params.items()}

    def _real_side(self, index: Tensor, params: dict[str, Tensor]) -> RealSide:
        """Real side: the loss's per-class statistics of the real features, chunk by chunk, no grad.
        The returned :class:`RealSide` serves a second pass (psi's gradient) kept or recomputed."""
        real = RealSide(self._real_bounds, self.real_per_class, len(self.classes),
                        lambda start, end: self._real_chunk_features(index, start, end, params),
                        keep=not self.checkpointing)
        self.matching.real_statistics(real)
        return real

    def _synthetic_groups(self, params: dict[str, Tensor]) -> Tensor:
        """Synthetic side, ``class_chunk`` classes at a time: each group's loss and backward, its
        images' gradient written into ``images.grad``. Returns (loss, match, calib) summed, (3,)."""
        for optimizer in self.optimizers():
            optimizer.zero_grad(set_to_none=True)
        image_grad = torch.empty_like(self.images)
        totals = torch.zeros(3, device=self.device)
        ipc = self.config.ipc
        for first in range(0, len(self.classes), self.class_chunk):
            rows = slice(first * ipc, min(first + self.class_chunk, len(self.classes)) * ipc)
            group_images = self.images.detach()[rows].requires_grad_(True)  # a leaf per group
            loss, match, calib = self._group_loss(group_images, first, params)
            self._backward(loss)
            image_grad[rows] = group_images.grad
            totals += torch.stack([loss.detach(), match.detach(), calib.detach()])
        self.images.grad = image_grad
        return totals

    def _sampler_backward(self, real: RealSide) -> None:
        """The loss's sampler (if it learns one) gets its gradient, reduced over processes."""
        self.matching.sampler_backward(real, self._all_reduce)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.image_optimizer, *self.matching.optimizers()]

    def _optimizer_step(self) -> None:
        """One step of every optimiser (through the fp16 loss scaler if any); pixels to [0, 1]."""
        if self.grad_scaler is None:
            for optimizer in self.optimizers():
                optimizer.step()
        else:
            for optimizer in self.optimizers():
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        with torch.no_grad():
            self.images.clamp_(0.0, 1.0)

    def step(self) -> dict[str, Any]:
        """Run one iteration; returns its metrics.

        ``loss``, ``match_loss`` and ``calib_loss`` are those of iteration ``loss_iteration``:
        the current one on CPU; on accelerators the latest one read back (every
        ``LOSS_LOG_EVERY`` iterations), so the loop never waits for the device to read them
        (None, with ``loss_iteration`` 0, before the first read; :meth:`read_metrics` reads now).
        ``seconds`` is the host's wall time for the call (on accelerators the device may still
        be working; averages over ``LOSS_LOG_EVERY`` iterations are exact).
        """
        start_time = time.perf_counter()
        self.phase = "draw"
        real_index, params = self._draw()
        self.phase = "real side"
        real = self._real_side(real_index, params)
        self.phase = "synthetic groups"
        totals = self._synthetic_groups(params)
        self.phase = "sampler backward"
        self._sampler_backward(real)
        self.phase = "optimizer step"  # from here on the state changes: see ncfm_core.retry
        self._optimizer_step()

        self.iteration += 1
        if self._all_reduce is not None:
            self._all_reduce(totals)
        self.pending_losses.append(totals)
        if self.iteration % self._sync_every == 0:
            self._read_pending()
        self.phase = "between iterations"
        return {
            "iteration": self.iteration,
            **self._last,
            "lr": self.image_optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start_time,
        }

    def read_metrics(self) -> dict[str, Any]:
        """Read every loss not yet read back (one host sync on accelerators) into the loss curve
        and the scheduler; returns the latest loss metrics. For the end of a run: reading
        between the aligned points moves the scheduler's inputs earlier than in a run that does
        not, so call it mid-run only if that does not matter (it never does on CPU)."""
        self._read_pending()
        return dict(self._last)

    def _read_pending(self) -> None:
        """Read the unread iterations' losses (one host sync) and feed the scheduler and the
        loss curve in iteration order."""
        if not self.pending_losses:
            return
        values = torch.stack(self.pending_losses).tolist()
        first_iteration = self.iteration - len(values) + 1
        for offset, (loss, match, calib) in enumerate(values):
            self.scheduler.step(loss)
            self.loss_window.append(loss)
            if len(self.loss_window) == LOSS_LOG_EVERY:
                self.loss_curve.append([first_iteration + offset, sum(self.loss_window) / LOSS_LOG_EVERY])
                self.loss_window = []
            self._last = {
                "loss": loss, "match_loss": match, "calib_loss": calib, "loss_iteration": first_iteration + offset,
            }
        self.pending_losses = []

    def run(self, until: int | None = None, *, checkpoint_every: int = 0, hooks: LoopHooks | None = None) -> bool:
        """THE distillation loop (every process of every job runs this one): iterate until
        ``self.iteration == until`` (default ``config.iterations``).

        Between iterations, in this order: ``hooks.progress`` gets the iteration's metrics (plus
        ``stage`` "distill" and ``total``); ``hooks.checkpoint(self)`` runs where
        :func:`checkpoint_due` says; ``hooks.stop_requested()`` is asked before each iteration
        and once at the end. Returns True when ``until`` was reached with no stop requested,
        False when a stop was requested (the distiller then sits between two iterations).
        """
        until = self.config.iterations if until is None else until
        hooks = hooks or LoopHooks()
        while self.iteration < until:
            if hooks.stop_requested is not None and hooks.stop_requested():
                return False
            self.mid_step = True  # a failure inside step() leaves no state worth checkpointing
            metrics = run_iteration(self, hooks.out_of_memory)  # step(), again on a smaller plan if it ran out
            self.mid_step = False
            if hooks.progress is not None:
                hooks.progress({"stage": "distill", "total": until, **metrics})
            if hooks.checkpoint is not None and checkpoint_due(self.iteration, until, checkpoint_every):
                hooks.checkpoint(self)
        return not (hooks.stop_requested is not None and hooks.stop_requested())

    # -- results and state -----------------------------------------------------------------
    def synthetic_set(self) -> tuple[Tensor, Tensor]:
        """The stored images (C*ipc, C, H, W) in [0, 1] and labels, detached, on CPU."""
        return self.images.detach().cpu().clone(), self.labels.cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (``ncfm_core.loop_state``): images, optimisers,
        RNG, iteration, the matching loss's own entries."""
        return loop_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a whole-set state is cut to this process's classes)."""
        load_loop_state(self, state)

    def sampler_tensors(self) -> dict[str, Tensor]:
        """A learned sampler's weights for ``sampler.safetensors`` (empty: none learned)."""
        return self.matching.sampler_tensors()
