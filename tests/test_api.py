"""The public Python API (ncfm_core.distill / open_synthetic / evaluate) and the normalisation a
result records: in the manifest, in synset.safetensors, shown by ``ncfm inspect``; the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_runner import invoke, one_json, one_thread
from PIL import Image

import ncfm_core
from ncfm_core.data import load_dataset
from ncfm_core.errors import ConfigError
from ncfm_core.store import Normalization, Store, load_synset, load_tensors, save_tensors
from ncfm_core.synset import decode_synset

TINY = dict(iterations=2, pool_size=1, pool_epochs=0, num_freqs=16, real_per_class=4, width=8)
EVAL_TINY = dict(epochs=1, repeats=1, width=8)

pytestmark = pytest.mark.usefixtures("single_thread")


def _digits_tensors():
    """sklearn's 8x8 digits as floats in [0, 1]: 300 to distill, 297 to test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32)  # (N, 8, 8): one channel implied
    labels = torch.tensor(bunch.target)
    return images[:300], labels[:300], images[1500:], labels[1500:]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """digits distilled into a store through the API, shared read-only by the tests here."""
    root = tmp_path_factory.mktemp("api_store")
    with one_thread():
        result = ncfm_core.distill("digits", 1, store=root, device="cpu", **TINY)
    return root, result


def test_the_api_is_exported_typed_and_documented():
    for name in ("distill", "open_synthetic", "evaluate", "dataset_from_tensors", "DistillResult",
                 "SyntheticDataset"):
        assert name in ncfm_core.__all__ and getattr(ncfm_core, name).__doc__, name
    assert ncfm_core.distill.__annotations__["return"] == "DistillResult"
    assert "(N, C, H, W)" in ncfm_core.open_synthetic.__doc__ + ncfm_core.SyntheticDataset.__doc__


def test_distill_from_tensors_in_memory_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.setenv("NCFM_HOME", str(tmp_path / "home"))
    train_x, train_y, test_x, test_y = _digits_tensors()
    result = ncfm_core.distill(train_x, 2, labels=train_y, test=(test_x, test_y), preset="digits",
                               device="cpu", **TINY)
    assert not (tmp_path / "home").exists()  # nothing kept anywhere
    assert result.ref is None and result.store is None
    assert result.images.shape == (20, 1, 8, 8) and result.factor == 2  # the digits preset: factor 2
    assert result.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert result.config.iterations == 2 and result.config.pool_size == 1 and result.config.dataset == "tensors"
    expected_mean = float(torch.round(train_x * 255).mean() / 255)
    assert result.mean == pytest.approx((expected_mean,)) and result.std[0] > 0
    assert result.record.dataset.normalization == Normalization(mean=result.mean, std=result.std)
    synthetic = result.synthetic()
    assert len(synthetic) == 80 and synthetic[0][0].shape == (1, 8, 8) and isinstance(synthetic[0][1], int)
    torch.testing.assert_close(synthetic.images, decode_synset(result.images, result.labels, 2)[0])
    evaluated = ncfm_core.evaluate(result, device="cpu", **EVAL_TINY)  # tested on the given test split
    assert len(evaluated.runs) == 1 and 0.0 <= evaluated.mean <= 1.0
    assert evaluated.train_set["size"] == 80 and evaluated.protocol["protocol"] == "ncfm"


def test_tensors_are_checked_with_errors_that_name_the_fix():
    train_x, train_y, test_x, test_y = _digits_tensors()
    with pytest.raises(ConfigError, match="divide 0..255 values by 255"):
        ncfm_core.distill(train_x * 255, 1, labels=train_y, **TINY)
    with pytest.raises(ConfigError, match="need their labels"):
        ncfm_core.distill(train_x, 1, **TINY)
    with pytest.raises(ConfigError, match=r"need a test split too: .*test=\(test_images, test_labels\)"):
        ncfm_core.distill(train_x, 1, labels=train_y, **TINY)
    with pytest.raises(ConfigError, match="unknown preset 'digit'"):
        ncfm_core.distill(train_x, 1, labels=train_y, test=(test_x, test_y), preset="digit", **TINY)
    no_test = ncfm_core.dataset_from_tensors((train_x * 255).to(torch.uint8), train_y.numpy())
    assert no_test.channels == 1 and no_test.test_images.shape == (0, 1, 8, 8)
    with pytest.raises(ConfigError, match="no test split; build it with test="):
        ncfm_core.evaluate((torch.rand(10, 1, 8, 8), torch.arange(10)), no_test, **EVAL_TINY)


def test_distill_into_a_store_then_open_synthetic_decodes_with_normalisation(stored):
    root, result = stored
    assert result.ref == "digits-ipc1@v1" and result.store == root
    digits = load_dataset("digits")
    assert result.mean == pytest.approx(digits.mean) and result.std == pytest.approx(digits.std)
    synthetic = ncfm_core.open_synthetic("digits-ipc1", store=root)
    assert isinstance(synthetic, torch.utils.data.Dataset)
    assert synthetic.images.shape == (40, 1, 16, 16) and synthetic.labels.shape == (40,)  # 10 x 1 x 2^2 decoded
    torch.testing.assert_close(synthetic.images, decode_synset(result.images, result.labels, 2)[0])
    assert synthetic.class_names == tuple(str(d) for d in range(10)) and synthetic.ref == "digits-ipc1@v1"
    assert synthetic.mean == pytest.approx(digits.mean) and synthetic.dataset_name == "digits"
    normalized = ncfm_core.open_synthetic("digits-ipc1@v1", store=root, normalize=True)
    image, label = normalized[3]
    torch.testing.assert_close(image, (synthetic[3][0] - digits.mean[0]) / digits.std[0])
    assert label == synthetic[3][1]
    loader = torch.utils.data.DataLoader(synthetic, batch_size=16)
    images, labels = next(iter(loader))
    assert images.shape == (16, 1, 16, 16) and labels.dtype == torch.int64


def test_evaluate_a_reference_records_it_like_ncfm_eval(stored, tmp_path):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(stored[0], root)
    result = ncfm_core.evaluate("digits-ipc1", protocol="dsa", store=root, device="cpu", **EVAL_TINY)
    assert result.protocol["protocol"] == "dsa" and result.protocol["lr"] == 0.01 and len(result.runs) == 1
    evals = Store(root).resolve("digits-ipc1").record().evals
    assert len(evals) == 1 and list(evals[0].accuracy.runs) == result.runs
    synthetic = ncfm_core.open_synthetic("digits-ipc1", store=root)
    again = ncfm_core.evaluate(synthetic, device="cpu", **EVAL_TINY)  # dataset from the manifest: digits
    pairs = ncfm_core.evaluate((synthetic.images, synthetic.labels), "digits", device="cpu", **EVAL_TINY)
    assert again.runs == pairs.runs  # same images, same seed, same protocol
    assert len(Store(root).resolve("digits-ipc1").record().evals) == 1  # only references are recorded


def test_the_api_passes_the_device_as_asked_and_the_job_boundary_alone_resolves_it(stored, monkeypatch):
    """Each API call resolves its device once, at the job boundary (parallel.ranked_job, which
    under torchrun adds LOCAL_RANK: tests/test_parallel.py), never before it; a set in memory
    is evaluated through a job too, with the same progress events."""
    import sys

    from ncfm_core import devices

    resolved = []  # (what was asked, the module that resolved it)
    real_resolve = devices.JobDevice.resolve.__func__

    def spy(cls, requested="auto", *, local_rank=None, prefer=None):
        resolved.append((str(requested), sys._getframe(1).f_globals["__name__"]))
        return real_resolve(cls, requested, local_rank=local_rank, prefer=prefer)

    monkeypatch.setattr(devices.JobDevice, "resolve", classmethod(spy))
    synthetic = ncfm_core.open_synthetic("digits-ipc1", store=stored[0])
    events = []
    result = ncfm_core.evaluate((synthetic.images, synthetic.labels), "digits", device="cpu", callback=events.append,
                                **EVAL_TINY)
    ncfm_core.distill("digits", 1, device="cpu", **TINY)
    assert resolved == [("cpu", "ncfm_core.parallel.protocol")] * 2  # as the user gave it, once per call
    assert [e for e in events if e["stage"] == "eval"] == [
        {"stage": "eval", "what": "synthetic", "model": "convnet", "repeat": 0, "repeats": 1,
         "accuracy": result.runs[0]},
    ]
    with pytest.raises(ConfigError, match="unknown device 'gpu'; choose one of auto, cpu, cuda, cuda:N, mps"):
        ncfm_core.distill("digits", 1, device="gpu", **TINY)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        ncfm_core.evaluate((synthetic.images, synthetic.labels), "digits", device="gpu", **EVAL_TINY)
    assert resolved[2:] == [("gpu", "ncfm_core.parallel.protocol")] * 2  # refused where it is resolved


def test_normalisation_is_in_the_manifest_the_synset_file_and_inspect(stored):
    root, _ = stored
    version = Store(root).resolve("digits-ipc1")
    recorded = version.record().dataset.normalization
    synset = load_synset(version.synset_path)
    assert synset.mean == pytest.approx(recorded.mean) and synset.std == pytest.approx(recorded.std)
    as_json = one_json(invoke("--store", root, "inspect", "digits-ipc1", "--json"))
    assert as_json["dataset"]["normalization"] == recorded.to_json()
    human = invoke("--store", root, "inspect", "digits-ipc1").stdout
    assert f"mean [{recorded.mean[0]:.4f}], std [{recorded.std[0]:.4f}]" in human


def test_older_synset_files_without_normalisation_still_load(stored, tmp_path):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(stored[0], root)
    version = Store(root).resolve("digits-ipc1")
    tensors, meta = load_tensors(version.synset_path, {"images": ((None,) * 4, torch.float32),
                                                      "labels": ((None,), torch.int64)})
    save_tensors(version.synset_path, tensors, {k: v for k, v in meta.items() if k not in ("mean", "std")})
    manifest = json.loads(version.manifest_path.read_text())
    manifest.pop("sha256", None)  # older versions recorded no hashes either
    version.manifest_path.write_text(json.dumps(manifest))
    old = load_synset(version.synset_path)
    assert old.mean is None and old.std is None and old.images.shape == (10, 1, 16, 16)
    recorded = version.record().dataset.normalization
    assert ncfm_core.open_synthetic("digits-ipc1", store=root).mean == pytest.approx(recorded.mean)
    manifest = json.loads(version.manifest_path.read_text())  # an older manifest too: nothing recorded
    del manifest["dataset"]["normalization"]
    version.manifest_path.write_text(json.dumps(manifest))
    synthetic = ncfm_core.open_synthetic("digits-ipc1", store=root)
    assert synthetic.mean is None and len(synthetic) == 40
    with pytest.raises(ConfigError, match="normalize=False"):
        ncfm_core.open_synthetic("digits-ipc1", store=root, normalize=True)
    assert "not recorded (made by an older ncfm)" in invoke("--store", root, "inspect", "digits-ipc1").stdout


def test_inspect_plot_draws_the_loss_curve_beside_the_images(stored, tmp_path, monkeypatch):
    import ncfm_core.plot as plot_module

    figures, save = [], plot_module._save
    monkeypatch.setattr(plot_module, "_save", lambda fig, path, dpi: (figures.append(fig), save(fig, path, dpi))[1])
    out = tmp_path / "run.png"
    result = one_json(invoke("--store", stored[0], "inspect", "digits-ipc1", "--plot", out, "--json"))
    assert result["plot"] == str(out) and out.is_file()
    with Image.open(out) as png:
        assert png.size == (1200, 650)  # 12 x max(4, 0.55 * 10 rows + 1) inches at 100 dpi
        assert np.asarray(png.convert("L")).std() > 0
    axes = figures[0].axes
    loss_axes = axes[0]
    assert (loss_axes.get_xlabel(), loss_axes.get_ylabel()) == ("iteration", "loss")
    assert len(axes) == 1 + 10  # the curve, then one image per class (IPC 1)
    assert [ax.get_ylabel() for ax in axes[1:]] == [str(d) for d in range(10)]


def test_inspect_plot_without_matplotlib_is_one_line_naming_the_extra(stored, tmp_path, monkeypatch):
    import sys

    from cli_runner import error_line

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("--store", stored[0], "inspect", "digits-ipc1", "--plot", tmp_path / "p.png", expect=1)
    assert "pip install 'ncfm[plot]'" in error_line(result) and not (tmp_path / "p.png").exists()
