"""The NCFM minmax loop, fused over classes, with an exact, resumable state.

One iteration (DESIGN.md, "Data flow"):

1. pick a pool member and ``beta ~ U(0, 1)``; blend its weights into the extractor in place;
2. draw ``real_per_class`` real images of every class (one vectorised op) and one DSA draw per
   class, shared by the real and the synthetic images of that class;
3. real side: features in no-grad chunks, per-class characteristic functions accumulated
   chunk by chunk (memory bounded by the chunk);
4. synthetic side: decode the multi-formation images, one forward for all classes, per-class CFs;
5. per-class NCFD summed (plus the calibration cross-entropy under the member's trained
   weights); ONE backward: the images descend, and psi, whose frequencies pass through a
   gradient-reversal node, ascends; one optimiser step each; clamp pixels to [0, 1].

Every random number comes from one generator whose state is part of :meth:`state_dict`, so a run
continued from a saved state ends with exactly the images of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ncfm_core import augment, cf
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset
from ncfm_core.errors import CorruptArtifactError
from ncfm_core.pool import Pool
from ncfm_core.sampler import GaussianSampler, MixtureSampler, reverse_gradient
from ncfm_core.synset import check_factor, decode_synset, init_synset

ProgressCallback = Callable[[dict[str, Any]], None]

STATE_FORMAT = 1
DEFAULT_REAL_CHUNK = 2048
LOSS_LOG_EVERY = 10  # iterations per point of the stored loss curve


class Distiller:
    """Holds the synthetic images, psi, both optimisers and the run's generator.

    ``dataset`` is moved to ``device`` once; nothing is read from disk inside :meth:`step`.
    """

    def __init__(self, config: DistillConfig, dataset: ImageDataset, pool: Pool, device: torch.device | str):
        self.config = config
        self.device = torch.device(device)
        self.num_classes = dataset.num_classes
        self.image_size = dataset.image_size
        self.allow_flip = dataset.allow_flip
        check_factor(self.image_size, config.factor)
        augment.parse_strategy(config.dsa_strategy, allow_flip=self.allow_flip)

        self.real_images = dataset.train_images.to(self.device)  # uint8 (N, C, H, W)
        labels = dataset.train_labels.to(self.device)
        # Class-sorted view of the real set for vectorised per-class sampling.
        self._sorted_index = torch.argsort(labels, stable=True)
        self._sorted_labels = labels[self._sorted_index].double()
        counts = torch.bincount(labels, minlength=self.num_classes)
        self._class_counts = counts
        self._class_offsets = torch.cumsum(counts, 0) - counts
        self.real_per_class = config.real_per_class

        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        images, self.labels = init_synset(
            self.real_images,
            [self._sorted_index[o : o + n] for o, n in zip(self._class_offsets.tolist(), counts.tolist())],
            config.ipc,
            config.factor,
            config.init,
            self.generator,
        )
        self.images = images.detach().clone().requires_grad_(True)  # stored form, (C*ipc, C, H, W)
        # No weight decay on pixels: decay would pull every image towards black.
        self.image_optimizer = torch.optim.AdamW([self.images], lr=config.image_lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.image_optimizer, mode="min", factor=0.5, patience=config.lr_patience
        )

        self.pool = pool.to(self.device)
        self.extractor = pool.spec.build().to(self.device).requires_grad_(False)
        self.teacher = pool.spec.build().to(self.device).requires_grad_(False)
        self.extractor.eval()
        self.teacher.eval()
        feature_dim = self.extractor.feature_dim

        self.learned_sampler = config.sampler and config.matching == "ncfm"
        if self.learned_sampler:
            self.sampler = MixtureSampler(
                feature_dim,
                config.num_freqs,
                num_components=config.num_components,
                init_scale=config.sampler_init_scale,
            ).to(self.device)
            self.sampler_optimizer: torch.optim.Optimizer | None = torch.optim.Adam(
                self.sampler.parameters(), lr=config.sampler_lr
            )
        else:
            self.sampler = GaussianSampler(feature_dim, config.num_freqs, scale=config.sampler_init_scale)
            self.sampler_optimizer = None

        self.real_chunk = config.real_chunk or DEFAULT_REAL_CHUNK
        self.iteration = 0
        self.loss_curve: list[list[float]] = []  # [iteration, mean loss over the last LOSS_LOG_EVERY]
        self._loss_window: list[float] = []

    # -- one iteration ---------------------------------------------------------------------
    def _sample_real(self) -> tuple[Tensor, Tensor]:
        """``real_per_class`` indices of every class, distinct while the class has enough.

        Sorting ``label + U(0,1)`` shuffles inside each class in one op; row ``c`` then reads
        the first ``B`` entries of class ``c``'s segment (cycling if the class is smaller).
        Returns indices (C*B,) and labels (C*B,).
        """
        keys = torch.rand(self._sorted_labels.shape, generator=self.generator, device=self.device, dtype=torch.float64)
        shuffled = self._sorted_index[torch.argsort(self._sorted_labels + keys)]
        b = self.real_per_class
        pos = self._class_offsets[:, None] + torch.arange(b, device=self.device)[None, :] % self._class_counts[:, None]
        labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(b)
        return shuffled[pos.reshape(-1)], labels

    def _real_features(self, index: Tensor, labels: Tensor, params: dict[str, Tensor]) -> Tensor:
        """No-grad features of the augmented real images, computed chunk by chunk. (n, d)."""
        chunks = []
        with torch.no_grad():
            for start in range(0, index.numel(), self.real_chunk):
                idx = index[start : start + self.real_chunk]
                lab = labels[start : start + self.real_chunk]
                x = self.real_images[idx].float().div_(255.0)
                x = augment.apply_params(x, lab, params)
                chunks.append(self._embed(x))
        return torch.cat(chunks)

    def _embed(self, x: Tensor) -> Tensor:
        features = self.extractor.features(x)
        return cf.normalize_features(features) if self.config.normalize_features else features

    def _real_cf(self, features: Tensor, labels: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class CF (C, F) of the real features.

        With fixed frequencies no graph is needed: a chunked accumulator. With psi, the real CF
        depends on the frequencies, so each chunk runs under activation checkpointing: only the
        (n, d) features are kept, the (chunk, F) cos/sin are recomputed in the backward pass.
        """
        c = self.num_classes
        if not freqs.requires_grad:
            acc = cf.CFAccumulator(c, freqs.shape[0], device=self.device, dtype=features.dtype)
            for start in range(0, features.shape[0], self.real_chunk):
                acc.add(features[start : start + self.real_chunk], labels[start : start + self.real_chunk], freqs)
            return acc.mean()
        counts = torch.bincount(labels, minlength=c).clamp_min(1).to(features.dtype)[:, None]
        re = im = None
        for start in range(0, features.shape[0], self.real_chunk):
            f_chunk = features[start : start + self.real_chunk]
            l_chunk = labels[start : start + self.real_chunk]
            chunk_counts = torch.bincount(l_chunk, minlength=c).to(features.dtype)[:, None]
            r, i = checkpoint(cf.cf_embed_per_class, f_chunk, l_chunk, freqs, c, use_reentrant=False)
            r, i = r * chunk_counts, i * chunk_counts  # means -> sums, so chunks add exactly
            re, im = (r, i) if re is None else (re + r, im + i)
        return re / counts, im / counts

    def step(self) -> dict[str, float]:
        """Run one iteration; returns its metrics."""
        start_time = time.perf_counter()
        config, gen = self.config, self.generator
        member = int(torch.randint(len(self.pool), (1,), generator=gen, device=self.device))
        beta = float(torch.rand((), generator=gen, device=self.device))
        self.pool.blend_into(self.extractor, member, beta)

        real_index, real_labels = self._sample_real()
        params = augment.sample_params(
            config.dsa_strategy, self.num_classes, self.image_size, gen, allow_flip=self.allow_flip
        )
        params = {k: v.to(self.device) for k, v in params.items()}
        real_features = self._real_features(real_index, real_labels, params)

        decoded, syn_labels = decode_synset(self.images, self.labels, config.factor)
        syn_input = augment.apply_params(decoded, syn_labels, params)
        syn_features = self._embed(syn_input)

        if config.matching == "mmd":
            per_class = cf.mmd_per_class(real_features, real_labels, syn_features, syn_labels, self.num_classes)
        else:
            freqs = self.sampler.sample(gen, device=self.device, dtype=syn_features.dtype)
            if self.learned_sampler:
                freqs = reverse_gradient(freqs)  # psi ascends what the images descend
            real_re, real_im = self._real_cf(real_features, real_labels, freqs)
            syn_re, syn_im = cf.cf_embed_per_class(syn_features, syn_labels, freqs, self.num_classes)
            per_class = cf.ncfd(real_re, real_im, syn_re, syn_im, alpha=config.alpha)
        match_loss = config.loss_scale * per_class.sum()

        calib_loss = torch.zeros((), device=self.device)
        if config.calib_weight > 0:
            self.pool.load_trained_into(self.teacher, member)
            calib_loss = config.calib_weight * F.cross_entropy(self.teacher(syn_input), syn_labels)
        loss = match_loss + calib_loss

        self.image_optimizer.zero_grad(set_to_none=True)
        if self.sampler_optimizer is not None:
            self.sampler_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.image_optimizer.step()
        if self.sampler_optimizer is not None:
            self.sampler_optimizer.step()
        with torch.no_grad():
            self.images.clamp_(0.0, 1.0)

        loss_value = float(loss.detach())
        self.scheduler.step(loss_value)
        self.iteration += 1
        self._loss_window.append(loss_value)
        if len(self._loss_window) == LOSS_LOG_EVERY:
            self.loss_curve.append([self.iteration, sum(self._loss_window) / LOSS_LOG_EVERY])
            self._loss_window = []
        return {
            "iteration": self.iteration,
            "loss": loss_value,
            "match_loss": float(match_loss.detach()),
            "calib_loss": float(calib_loss.detach()),
            "lr": self.image_optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start_time,
        }

    def run(
        self,
        until: int,
        callback: ProgressCallback | None = None,
        on_checkpoint: Callable[[Distiller], None] | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        """Iterate until ``self.iteration == until``.

        ``callback`` gets each iteration's metrics (plus "total"); ``on_checkpoint(self)`` is
        called every ``checkpoint_every`` iterations (0: never).
        """
        while self.iteration < until:
            metrics = self.step()
            if callback is not None:
                callback({"stage": "distill", "total": until, **metrics})
            if on_checkpoint is not None and checkpoint_every > 0 and self.iteration % checkpoint_every == 0:
                on_checkpoint(self)

    # -- results and state -----------------------------------------------------------------
    def synthetic_set(self) -> tuple[Tensor, Tensor]:
        """The stored images (C*ipc, C, H, W) in [0, 1] and labels, detached, on CPU."""
        return self.images.detach().cpu().clone(), self.labels.cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: images, optimisers, psi, RNG, iteration."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "iteration": self.iteration,
            "images": self.images.detach().cpu().clone(),
            "image_optimizer": self.image_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "loss_curve": [list(p) for p in self.loss_curve],
            "loss_window": list(self._loss_window),
        }
        if self.learned_sampler:
            state["sampler"] = {k: v.detach().cpu().clone() for k, v in self.sampler.state_dict().items()}
            state["sampler_optimizer"] = self.sampler_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CorruptArtifactError(f"checkpoint format {state.get('format')!r} is not {STATE_FORMAT}")
        if tuple(state["images"].shape) != tuple(self.images.shape):
            raise CorruptArtifactError(
                f"checkpoint images have shape {tuple(state['images'].shape)}, expected {tuple(self.images.shape)}"
            )
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.image_optimizer.load_state_dict(state["image_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        if self.learned_sampler:
            if "sampler" not in state:
                raise CorruptArtifactError("checkpoint has no sampler state but the run uses psi")
            self.sampler.load_state_dict(state["sampler"])
            self.sampler_optimizer.load_state_dict(state["sampler_optimizer"])
        self.iteration = int(state["iteration"])
        self.loss_curve = [list(p) for p in state.get("loss_curve", [])]
        self._loss_window = list(state.get("loss_window", []))

    def sampler_tensors(self) -> dict[str, Tensor]:
        """psi's weights for ``sampler.safetensors`` (empty with the Gaussian sampler)."""
        if not self.learned_sampler:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in self.sampler.state_dict().items()}
