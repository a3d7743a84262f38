"""Tiny ImageNet and the 10-class ImageNet subsets used by MTT and later distillation papers.

Neither can be downloaded here: both read an existing tree from ``data_dir`` and say where
to get it when it is missing.

Subset class lists: MTT (Cazenavette et al. 2022, ``utils.py``, ``Config``) gives each
subset as ImageNet-1k class indices, in the order that defines its labels. We keep those
indices and the matching WordNet ids. An index is a position in the sorted list of the
1,000 ILSVRC-2012 wnids (what ``torchvision.datasets.ImageNet``, which MTT uses, assigns).
The wnids were checked against two independent public index->wnid tables; the imagenette
and imagewoof ones are also fast.ai's folder names (torchvision's ``Imagenette`` lists the
same ten, parachute included as n03888257 = index 701).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ncfm_core.data.images import list_images, load_labelled_splits
from ncfm_core.data.registry import (
    PAPER_PRESET,
    DatasetShape,
    ImageDataset,
    default_data_dir,
    make_dataset,
    register_dataset,
)
from ncfm_core.errors import NcfmError, NotFoundError


class SubsetClass(NamedTuple):
    index: int  # ImageNet-1k class index, as in MTT's lists
    wnid: str
    name: str


# Order matters: a class's label is its position here (MTT's order).
IMAGENET_SUBSETS: dict[str, tuple[SubsetClass, ...]] = {
    "imagenette": (
        SubsetClass(0, "n01440764", "tench"),
        SubsetClass(217, "n02102040", "English springer"),
        SubsetClass(482, "n02979186", "cassette player"),
        SubsetClass(491, "n03000684", "chain saw"),
        SubsetClass(497, "n03028079", "church"),
        SubsetClass(566, "n03394916", "French horn"),
        SubsetClass(569, "n03417042", "garbage truck"),
        SubsetClass(571, "n03425413", "gas pump"),
        SubsetClass(574, "n03445777", "golf ball"),
        SubsetClass(701, "n03888257", "parachute"),
    ),
    "imagewoof": (
        SubsetClass(193, "n02096294", "Australian terrier"),
        SubsetClass(182, "n02093754", "Border terrier"),
        SubsetClass(258, "n02111889", "Samoyed"),
        SubsetClass(162, "n02088364", "beagle"),
        SubsetClass(155, "n02086240", "Shih-Tzu"),
        SubsetClass(167, "n02089973", "English foxhound"),
        SubsetClass(159, "n02087394", "Rhodesian ridgeback"),
        SubsetClass(273, "n02115641", "dingo"),
        SubsetClass(207, "n02099601", "golden retriever"),
        SubsetClass(229, "n02105641", "Old English sheepdog"),
    ),
    "imagefruit": (
        SubsetClass(953, "n07753275", "pineapple"),
        SubsetClass(954, "n07753592", "banana"),
        SubsetClass(949, "n07745940", "strawberry"),
        SubsetClass(950, "n07747607", "orange"),
        SubsetClass(951, "n07749582", "lemon"),
        SubsetClass(957, "n07768694", "pomegranate"),
        SubsetClass(952, "n07753113", "fig"),
        SubsetClass(945, "n07720875", "bell pepper"),
        SubsetClass(943, "n07718472", "cucumber"),
        SubsetClass(948, "n07742313", "Granny Smith"),
    ),
    "imagemeow": (
        SubsetClass(281, "n02123045", "tabby cat"),
        SubsetClass(282, "n02123159", "tiger cat"),
        SubsetClass(283, "n02123394", "Persian cat"),
        SubsetClass(284, "n02123597", "Siamese cat"),
        SubsetClass(285, "n02124075", "Egyptian cat"),
        SubsetClass(291, "n02129165", "lion"),
        SubsetClass(292, "n02129604", "tiger"),
        SubsetClass(290, "n02128925", "jaguar"),
        SubsetClass(289, "n02128757", "snow leopard"),
        SubsetClass(287, "n02127052", "lynx"),
    ),
    "imagesquawk": (
        SubsetClass(84, "n01806143", "peacock"),
        SubsetClass(130, "n02007558", "flamingo"),
        SubsetClass(88, "n01818515", "macaw"),
        SubsetClass(144, "n02051845", "pelican"),
        SubsetClass(145, "n02056570", "king penguin"),
        SubsetClass(22, "n01614925", "bald eagle"),
        SubsetClass(96, "n01843383", "toucan"),
        SubsetClass(9, "n01518878", "ostrich"),
        SubsetClass(100, "n01860187", "black swan"),
        SubsetClass(89, "n01819313", "sulphur-crested cockatoo"),
    ),
    "imageyellow": (
        SubsetClass(309, "n02206856", "bee"),
        SubsetClass(986, "n12057211", "yellow lady's slipper"),
        SubsetClass(954, "n07753592", "banana"),
        SubsetClass(951, "n07749582", "lemon"),
        SubsetClass(987, "n12144580", "corn"),
        SubsetClass(779, "n04146614", "school bus"),
        SubsetClass(599, "n03530642", "honeycomb"),
        SubsetClass(291, "n02129165", "lion"),
        SubsetClass(72, "n01773157", "black and gold garden spider"),
        SubsetClass(11, "n01531178", "goldfinch"),
    ),
}

_SUBSET_SIZE = 128
_TINY_SIZE = 64
_TINY_FOLDER = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


# -- Tiny ImageNet ---------------------------------------------------------------------------


def _tiny_root(data_dir: Path | None) -> Path:
    base = data_dir if data_dir is not None else default_data_dir()
    for candidate in (base / _TINY_FOLDER, base):
        if (candidate / "wnids.txt").is_file() and (candidate / "train").is_dir():
            return candidate
    raise NotFoundError(
        f"Tiny ImageNet not found: expected {base / _TINY_FOLDER}/wnids.txt and train/<wnid>/images/*.JPEG; "
        f"download {_TINY_URL}, unzip it into {base}, "
        f"or pass --data-dir pointing at the folder holding '{_TINY_FOLDER}'"
    )


def _tiny_class_names(root: Path, wnids: list[str]) -> list[str]:
    """First name of each wnid in ``words.txt`` (``wnid<TAB>name, other names``); the wnid
    itself where the file or the entry is missing."""
    names: dict[str, str] = {}
    words = root / "words.txt"
    if words.is_file():
        wanted = set(wnids)
        for line in words.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted and text.strip():
                names[wnid] = text.split(",")[0].strip()
    return [names.get(wnid, wnid) for wnid in wnids]


@register_dataset("tinyimagenet", shape=DatasetShape(200, 3, _TINY_SIZE, 100_000), preset=PAPER_PRESET)
def load_tinyimagenet(*, data_dir: Path | None, image_size: int | None, download: bool) -> ImageDataset:
    """Tiny ImageNet: 200 classes of 64x64 RGB images (500 train, 50 val each); the labelled
    val split is the test split. Classes are the wnids of ``wnids.txt`` in sorted order (the
    ImageFolder order MTT and NCFM use). ``download`` is ignored: it is not downloadable here.
    """
    root = _tiny_root(data_dir)
    wnids = sorted({line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip()})
    label_of = {wnid: label for label, wnid in enumerate(wnids)}

    train: list[tuple[Path, int]] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise NotFoundError(f"Tiny ImageNet class folder missing: expected {folder}; re-extract {_TINY_URL}")
        train += [(path, label_of[wnid]) for path in list_images(folder)]

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise NotFoundError(f"Tiny ImageNet val labels missing: expected {annotations}; re-extract {_TINY_URL}")
    test: list[tuple[Path, int]] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise NcfmError(
                f"{annotations}, line {number}: expected 'filename<TAB>wnid<TAB>...'; re-extract {_TINY_URL}"
            )
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:  # a wnids.txt trimmed to fewer classes keeps only those
            continue
        path = root / "val" / "images" / filename
        if not path.is_file():
            raise NotFoundError(f"Tiny ImageNet val image missing: expected {path} (listed in {annotations.name})")
        test.append((path, label_of[wnid]))
    test.sort(key=lambda item: item[0].name)

    size = image_size or _TINY_SIZE
    (train_split, test_split), fingerprint = load_labelled_splits("tinyimagenet", root, [train, test], size)
    return make_dataset("tinyimagenet", train_split, test_split, _tiny_class_names(root, wnids), fingerprint)


# -- ImageNet subsets ------------------------------------------------------------------------


def _subset_candidates(subset: str, base: Path) -> list[Path]:
    """Folders that may hold ``train/<wnid>/`` and ``val/<wnid>/``: the given one, an
    ``imagenet`` child, and fast.ai's archive folders for imagenette / imagewoof."""
    candidates = [base, base / "imagenet"]
    fastai = {"imagenette": "imagenette2", "imagewoof": "imagewoof2"}.get(subset)
    if fastai:
        candidates += [base / fastai, base / f"{fastai}-320", base / f"{fastai}-160"]
    return candidates


def _subset_root(subset: str, base: Path, wnids: list[str]) -> Path:
    best: tuple[int, Path] | None = None
    for candidate in _subset_candidates(subset, base):
        present = sum((candidate / "train" / w).is_dir() and (candidate / "val" / w).is_dir() for w in wnids)
        if present == len(wnids):
            return candidate
        if present and (best is None or present > best[0]):
            best = (present, candidate)
    if best is not None:
        root = best[1]
        missing = [w for w in wnids if not ((root / "train" / w).is_dir() and (root / "val" / w).is_dir())]
        raise NotFoundError(
            f"{subset}: {root} lacks train/ and val/ folders for {len(missing)} of its classes "
            f"({', '.join(missing)}); add them (ImageNet ILSVRC-2012 in ImageFolder layout)"
        )
    raise NotFoundError(
        f"{subset} not found: expected {base}/train/<wnid>/*.JPEG and {base}/val/<wnid>/*.JPEG "
        f"(ImageNet ILSVRC-2012 in ImageFolder layout, or fast.ai's imagenette2/imagewoof2 for those two); "
        f"pass --data-dir pointing at that folder"
    )


def _make_subset_loader(subset: str) -> None:
    classes = IMAGENET_SUBSETS[subset]
    # The train splits vary a little per class; 1,300 per class is ImageNet's maximum.
    shape = DatasetShape(len(classes), 3, _SUBSET_SIZE, 1_300 * len(classes))

    @register_dataset(subset, shape=shape, preset=PAPER_PRESET)
    def load_subset(*, data_dir: Path | None, image_size: int | None, download: bool) -> ImageDataset:
        base = data_dir if data_dir is not None else default_data_dir()
        wnids = [c.wnid for c in classes]
        root = _subset_root(subset, base, wnids)
        splits = []
        for split in ("train", "val"):
            items: list[tuple[Path, int]] = []
            for label, wnid in enumerate(wnids):
                paths = list_images(root / split / wnid)
                if not paths:
                    raise NotFoundError(f"{subset}: no images in {root / split / wnid}; add that class's images")
                items += [(path, label) for path in paths]
            splits.append(items)
        size = image_size or _SUBSET_SIZE
        (train_split, test_split), fingerprint = load_labelled_splits(subset, root, splits, size)
        return make_dataset(subset, train_split, test_split, [c.name for c in classes], fingerprint)

    load_subset.__name__ = f"load_{subset}"
    load_subset.__doc__ = (
        f"{subset}: 10 ImageNet classes ({', '.join(c.name for c in classes)}), resized "
        f"(shorter side, then centre crop) to 128x128 unless image_size says otherwise; train/ is "
        f"the train split and val/ the test split. ``download`` is ignored: not downloadable here."
    )


for _subset in IMAGENET_SUBSETS:
    _make_subset_loader(_subset)
