"""The real images one distillation iteration reads: per class, distinct train images drawn
uniformly at random, all classes in one vectorised op on the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ncfm_core.errors import ConfigError

__all__ = ["RealBatches"]


class RealBatches:
    """Draws ``per_class`` distinct train indices of every class (:meth:`draw`).

    ``per_class`` is the number asked, capped at the smallest class. One DSA draw serves a whole
    class, so a second copy of an image in the same iteration is an identical feature: it carries
    no information and only re-weights the class mean. One cap for every class keeps the
    class-major layout rectangular (reshape sums, no atomics, equal chunks). ``notes``: one-line
    facts for the job layer to log once. ``classes``: the block of classes whose rows this
    process keeps (every process draws the same keys, for every class); ``labels`` (rows,) are
    their labels, class-major.
    """

    def __init__(self, class_indices: Sequence[Tensor], class_names: Sequence[str], asked: int, classes: range,
                 device: torch.device) -> None:
        counts = [len(idx) for idx in class_indices]
        empty = [class_names[c] for c, n in enumerate(counts) if n == 0]
        if empty:
            raise ConfigError(f"class {empty[0]!r} has no training images; every class needs some to distill")
        self.per_class = min(asked, min(counts))
        self.notes: list[str] = []
        if self.per_class < asked:
            smallest = class_names[counts.index(min(counts))]
            self.notes.append(
                f"real images per class capped at {self.per_class} (asked {asked}): the smallest class, "
                f"{smallest!r}, holds {min(counts)} train images, and a repeated image under the class's one "
                f"augmentation draw adds no information"
            )
        # A (C, n_max) table of each class's train indices, padded, and the padding's mask.
        n_max = max(counts)
        table = torch.zeros(len(class_indices), n_max, dtype=torch.int64)
        for c, idx in enumerate(class_indices):
            table[c, : len(idx)] = idx
        self._table = table.to(device)
        self._padding = (torch.arange(n_max)[None, :] >= torch.tensor(counts)[:, None]).to(device)
        self._owned = slice(classes.start, classes.stop)
        self.labels = torch.arange(classes.start, classes.stop, device=device).repeat_interleave(self.per_class)

    def draw(self, generator: torch.Generator) -> Tensor:
        """Indices (rows,) into the train set, class-major, for the owned classes.

        Every train image gets a uniform key; a per-class ``topk`` of the smallest keys is a
        uniformly random ordered subset of the class, in O(N) rather than the O(N log N) of
        sorting the whole set. The keys are drawn for the whole (C, n_max) table whatever the
        batch, so a run asking more than the smallest class draws the same images as one asking
        exactly that. Every class holds at least ``per_class`` images (the cap), so the first
        ``per_class`` ranks are the batch.
        """
        keys = torch.rand(self._table.shape, generator=generator, device=self._table.device, dtype=torch.float64)
        keys.masked_fill_(self._padding, 2.0)  # padding sorts after every real key in [0, 1)
        columns = torch.topk(keys, self.per_class, dim=1, largest=False, sorted=True).indices  # (C, per_class)
        return self._table[self._owned].gather(1, columns[self._owned]).reshape(-1)
