"""``ncfm``: the characteristic-function discrepancy (NCFD), with the learned sampler psi or,
without it (``DistillConfig.sampler`` False), frequencies drawn from ``N(0, scale^2 I)``.

Per iteration: F frequencies are drawn; the real side gives each class's CF (re, im), each
(C, F), from float64 sums of cos/sin over the chunks; each class group's synthetic CF is compared
with it by ``cf.ncfd``. With psi, the frequencies are a detached leaf that every group's backward
adds its gradient to; the real CF's gradient (it is a leaf too) is turned into the frequencies'
gradient in closed form, chunk by chunk (``cf.cf_chunk_freq_grad``); the sum then goes through
ONE backward into psi with the sign reversed: psi ascends what the images descend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ncfm_core import cf
from ncfm_core.config import DistillConfig
from ncfm_core.errors import CorruptArtifactError
from ncfm_core.matching.base import F32, AllReduce, IterationShape, MatchingCosts, MatchingLoss, RealSide
from ncfm_core.matching.registry import register_matching
from ncfm_core.sampler import GaussianSampler, MixtureSampler, reverse_gradient

PSI_CHUNK_UNITS = 0.5  # launch units of one chunk of psi's real-side gradient: projection, sin/cos, weights, one matmul


@register_matching("ncfm")
class CharacteristicFunctionMatching(MatchingLoss):
    description = "characteristic functions at frequencies from the learned sampler psi, or Gaussian with the sampler off"

    def __init__(self, config: DistillConfig, *, feature_dim: int, device: torch.device, cf_precision: str) -> None:
        super().__init__(config, feature_dim=feature_dim, device=device, cf_precision=cf_precision)
        self.learned = bool(config.sampler)
        if self.learned:
            self.sampler: MixtureSampler | GaussianSampler = MixtureSampler(
                feature_dim, config.num_freqs, num_components=config.num_components,
                init_scale=config.sampler_init_scale,
            ).to(device)
            self.optimizer: torch.optim.Optimizer | None = torch.optim.Adam(
                self.sampler.parameters(), lr=config.sampler_lr
            )
        else:
            self.sampler = GaussianSampler(feature_dim, config.num_freqs, scale=config.sampler_init_scale)
            self.optimizer = None
        self._drawn: Tensor | None = None  # this iteration's frequencies, psi's graph attached
        self._freqs: Tensor | None = None  # the same values as a leaf: the groups accumulate its .grad
        self._real: tuple[Tensor, Tensor] | None = None  # real CF (re, im), each (C, F)

    def begin(self, generator: torch.Generator) -> None:
        # psi's graph ends here; the groups use a detached leaf, so their backwards only add to
        # its .grad and psi sees ONE backward, in sampler_backward.
        self._drawn = self.sampler.sample(generator, device=self.device, dtype=torch.float32)
        self._freqs = self._drawn.detach().requires_grad_(self.learned)

    @torch.no_grad()
    def real_statistics(self, real: RealSide) -> None:
        freqs = self._freqs.detach()
        sums_re = torch.zeros(real.num_classes, freqs.shape[0], dtype=torch.float64, device=self.device)
        sums_im = torch.zeros_like(sums_re)
        for start, features in real.chunks(again=self.learned):
            first, cos_sums, sin_sums = cf.cf_chunk_sums(features, freqs, start, real.per_class, self.cf_precision)
            sums_re[first : first + cos_sums.shape[0]] += cos_sums.double()
            sums_im[first : first + sin_sums.shape[0]] += sin_sums.double()
        # Leaves: with psi, the groups' backwards leave the real CF's gradient in their .grad.
        self._real = tuple((sums / real.per_class).float().requires_grad_(self.learned) for sums in (sums_re, sums_im))

    def group_loss(self, features: Tensor, classes: slice, rows_per_class: int) -> Tensor:
        syn_re, syn_im = cf.cf_class_major(features, self._freqs, rows_per_class, self.cf_precision)  # (k, F) each
        real_re, real_im = self._real
        return cf.ncfd(real_re[classes], real_im[classes], syn_re, syn_im, alpha=self.config.alpha)

    def sampler_backward(self, real: RealSide, all_reduce: AllReduce | None) -> None:
        if self.learned:
            freqs = self._freqs.detach()
            (real_re, real_im), through_real = self._real, torch.zeros_like(freqs)
            with torch.no_grad():
                for start, features in real.again():
                    through_real += cf.cf_chunk_freq_grad(
                        features, freqs, start, real.per_class, real_re.grad, real_im.grad, self.cf_precision
                    )
            freq_grad = self._freqs.grad + through_real
            if all_reduce is not None:
                all_reduce(freq_grad)  # every process's classes: one psi, identical everywhere
            reverse_gradient(self._drawn).backward(freq_grad)  # psi ascends what the images descend
        self._drawn = self._freqs = self._real = None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.optimizer is None else [self.optimizer]

    def state_dict(self) -> dict[str, Any]:
        if not self.learned:
            return {}
        return {
            "sampler": {k: v.detach().cpu().clone() for k, v in self.sampler.state_dict().items()},
            "sampler_optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.learned:
            return
        if "sampler" not in state:
            raise CorruptArtifactError("checkpoint has no sampler state but the run uses psi")
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_state_dict(state["sampler_optimizer"])

    def sampler_tensors(self) -> dict[str, Tensor]:
        if not self.learned:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in self.sampler.state_dict().items()}

    @classmethod
    def costs(cls, config: DistillConfig, shape: IterationShape) -> MatchingCosts:
        """The frequencies (F, d): with psi, its sampling graph (the draw, the per-frequency scales
        and the noise it saves) and the groups' gradient, psi and Adam; without, the draw and its
        noise. The per-class CF accumulators (C, F) in fp64 with their fp32 copies and gradients;
        a real chunk's (chunk, F) projections with cos and sin; a group's projections, cos, sin
        and gradient. With psi and no checkpointing, the real features kept for its gradient (kept
        between phases); its phase "real-backward": a chunk's projections, cos, sin and weights
        (4 x (chunk, F)), psi's backward through the frequencies (4 x (F, d): the gradient through
        the real CF, a chunk's share, their sum, and the reversed gradient into the draw), plus
        the stored features or a recomputed chunk."""
        c, d, f, learned = shape.num_classes, shape.feature_dim, config.num_freqs, bool(config.sampler)
        sampler = (4 if learned else 2) * f * d * F32
        if learned:
            components = config.num_components or max(1, f // 16)
            sampler += 4 * components * (d + 1) * F32 + 4 * f * components * F32
        stored = shape.real_rows * d * F32 if learned and not shape.checkpointing else 0
        flops = {
            "real CF projections": 2 * shape.real_rows * d * f,
            "synthetic CF projections + grad": 2 * shape.synthetic_rows * d * f * (3 if learned else 2),
        }
        network_flops = {}
        phases = {}
        if learned:
            phases["real-backward"] = {
                "real CF gradient (projections, cos, sin, weights)": shape.real_chunk_rows * 4 * f * F32,
                "psi backward through the frequencies": 4 * f * d * F32,
                "recomputed real chunk": shape.real_chunk_recompute_bytes if shape.checkpointing else 0,
                "stored real features (psi)": stored,
            }
            flops["psi gradient through the real CF"] = 2 * 2 * shape.real_rows * d * f
            if shape.checkpointing:
                network_flops["real recompute (checkpointing)"] = shape.real_rows * shape.real_forward_flops
        psi_units = PSI_CHUNK_UNITS + (1.0 if shape.checkpointing else 0.0)
        return MatchingCosts(
            persistent={"per-class CF/mean accumulators": 2 * c * f * (8 + F32 + F32), "frequencies and psi": sampler},
            real_chunk_bytes=shape.real_chunk_rows * 3 * f * F32,
            real={"stored real features (psi)": stored},
            synthetic={"synthetic CF (projections, cos, sin, grad)": shape.group_rows * 4 * f * F32,
                       "stored real features (psi)": stored},
            phases=phases,
            flops=flops,
            network_flops=network_flops,
            passes={"psi chunks": (shape.real_chunks if learned else 0, psi_units)},
            kept_between_phases=stored,
        )
