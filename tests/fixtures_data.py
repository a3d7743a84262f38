"""Writers of tiny dataset fixtures in the real on-disk formats, called at test time.

Nothing binary is committed: every test builds what it needs under ``tmp_path``.
Pixel values encode what the tests check (labels, channel order, split membership), and
all randomness comes from seeded ``torch.Generator``s.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# -- CIFAR python batches --------------------------------------------------------------------


class Py2StylePickler(pickle._Pickler):  # the pure-Python pickler lets us replace one writer
    """A protocol-2 pickler that writes ``bytes`` the way Python 2 wrote ``str``.

    The original CIFAR files were pickled by Python 2, where strings are
    SHORT_BINSTRING/BINSTRING opcodes and the only globals are numpy's. Python 3's own
    protocol-2 pickler instead writes bytes as a call to ``_codecs.encode``, a global the
    original files never contain (and that our restricted reader rightly refuses).
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string


def py2_pickle_bytes(obj: object) -> bytes:
    """``obj`` pickled like the original CIFAR files: protocol 2, Python 2 strings, and the
    array reconstructor named ``numpy.core.multiarray`` as numpy 1.x did."""
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    # GLOBAL opcodes are newline-terminated text, so renaming the module is a plain replace.
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_images(labels: list[int], generator: torch.Generator) -> np.ndarray:
    """``(N, 3072)`` uint8 rows in CIFAR order (1024 R, then G, then B). Random, except that
    the first red value is the label and the first green value is 100 + the label, so a
    test can check both the label alignment and the channel order."""
    data = torch.randint(0, 256, (len(labels), 3072), dtype=torch.uint8, generator=generator)
    data[:, 0] = torch.tensor(labels, dtype=torch.uint8)
    data[:, 1024] = torch.tensor(labels, dtype=torch.uint8) + 100
    return data.numpy()


def _labels(num_classes: int, per_class: int, generator: torch.Generator) -> list[int]:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=generator)].tolist()


def write_cifar10(root: Path, per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` with five train batches, a test batch and
    ``batches.meta``; train images are spread over the five batches. Returns the folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    train_labels = _labels(10, per_class, generator)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for number, chunk in enumerate(chunks, start=1):
        labels = [train_labels[i] for i in chunk]
        batch = {
            b"batch_label": f"training batch {number} of 5".encode(),
            b"labels": labels,
            b"data": cifar_images(labels, generator),
            b"filenames": [f"img_{number}_{i}.png".encode() for i in range(len(labels))],
        }
        (folder / f"data_batch_{number}").write_bytes(py2_pickle_bytes(batch))
    test_labels = _labels(10, test_per_class, generator)
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels,
        b"data": cifar_images(test_labels, generator),
        b"filenames": [f"test_{i}.png".encode() for i in range(len(test_labels))],
    }
    (folder / "test_batch").write_bytes(py2_pickle_bytes(test))
    meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle_bytes(meta))
    return folder


CIFAR100_NAMES = [f"fine_{i:02d}" for i in range(100)]


def write_cifar100(root: Path, per_class: int = 2, test_per_class: int = 1, seed: int = 1) -> Path:
    """Write ``root/cifar-100-python`` with ``train``, ``test`` and ``meta``. Returns it."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        fine = _labels(100, count, generator)
        batch = {
            b"filenames": [f"{split}_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": cifar_images(fine, generator),
        }
        (folder / split).write_bytes(py2_pickle_bytes(batch))
    meta = {
        b"fine_label_names": [n.encode() for n in CIFAR100_NAMES],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(py2_pickle_bytes(meta))
    return folder


# -- image trees -----------------------------------------------------------------------------


def solid_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (24, 18)) -> None:
    """Write a one-colour RGB image of ``size`` (width, height); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


PALETTE = [
    (230, 25, 25),
    (25, 230, 25),
    (25, 25, 230),
    (230, 230, 25),
    (230, 25, 230),
    (25, 230, 230),
    (128, 128, 128),
    (250, 250, 250),
    (10, 10, 10),
    (140, 60, 0),
]
"""Ten colours far apart, so JPEG's small errors never make one look like another."""


def write_tinyimagenet(root: Path, wnids: list[str], train_per_class: int = 2) -> tuple[Path, list[str]]:
    """Write ``root/tiny-imagenet-200`` for ``wnids`` (in the given, unsorted order), class k
    painted ``PALETTE[k]``. Val images are named val_0.. and assigned to classes in an order
    unrelated to their names, as in the real ``val_annotations.txt``. Returns the folder
    and the wnid of each val image, in file-name order."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = [f"{w}\tname of {w}, another name\n" for w in wnids] + ["n00000001\tunused entry\n"]
    (folder / "words.txt").write_text("".join(words))
    for k, wnid in enumerate(wnids):
        class_dir = folder / "train" / wnid
        for i in range(train_per_class):
            solid_image(class_dir / "images" / f"{wnid}_{i}.JPEG", PALETTE[k], (64, 64))
        (class_dir / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val_wnids = [wnids[k % len(wnids)] for k in (2, 0, 1, 1, 2, 0)]
    lines = []
    for i, wnid in enumerate(val_wnids):
        solid_image(folder / "val" / "images" / f"val_{i}.JPEG", PALETTE[wnids.index(wnid)], (64, 64))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t3\t60\t62\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    (folder / "test" / "images").mkdir(parents=True)  # unlabelled in the real archive: ignored
    return folder, val_wnids


def write_imagenet_tree(
    root: Path, wnids: list[str], train_per_class: int = 2, val_per_class: int = 1, size: tuple[int, int] = (40, 30)
) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (ImageFolder layout
    of ImageNet, and of fast.ai's imagenette2), the i-th wnid painted ``PALETTE[i]``."""
    for k, wnid in enumerate(wnids):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for i in range(count):
                solid_image(root / split / wnid / f"{wnid}_{i}.JPEG", PALETTE[k % len(PALETTE)], size)
    return root
