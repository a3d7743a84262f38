"""The results scripts run end to end on tiny settings and write what the docs link to; their
table arithmetic and the matplotlib plot are checked against hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name in sys.modules:  # the scripts import kit and report_kit by these names: share one module
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit():
    return _load("kit")


@pytest.fixture(scope="module")
def plots():
    return _load("report_kit")


def test_digits_table_quick_writes_tables_plots_and_raw_numbers(tmp_path):
    digits_table = _load("digits_table")
    argv = ["--quick", "--out", str(tmp_path), "--ipcs", "1", "--alphas", "1", "--freqs", "16"]
    assert digits_table.main(argv) == 0

    page = (tmp_path / "results" / "digits.md").read_text()
    assert "these numbers mean nothing" in page  # --quick says so on the page itself
    assert f"`uv run python benchmarks/digits_table.py {' '.join(argv)}`" in page
    for label in ("Random real subset", "Mean matching", "NCFM without psi", "NCFM with psi", "Does psi help"):
        assert label in page, label
    record = json.loads((tmp_path / "results" / "digits.json").read_text())
    assert [row["method"] for row in record["main"]] == ["random", "mmd", "ncfm_no_psi", "ncfm"]
    for row in record["main"]:
        assert len(row["runs"]) == 2 and all(0.0 <= acc <= 1.0 for acc in row["runs"])
        assert math.isclose(row["ior"], row["mean"] - record["main"][0]["mean"], abs_tol=1e-12)
        assert math.isclose(row["hlr"], record["full"]["mean"] - row["mean"], abs_tol=1e-12)
    assert [point["alpha"] for point in record["alpha_sweep"]] == [1.0]
    assert [point["num_freqs"] for point in record["freq_sweep"]] == [16]
    for picture in ("alpha_sweep.png", "freq_sweep.png"):
        path = tmp_path / "images" / picture
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (640, 400)
        assert path.stat().st_size < 300_000

    # --reuse takes every cell from the first run: nothing is recomputed, the numbers are the same
    again = tmp_path / "again"
    reuse = ["--quick", "--out", str(again), "--ipcs", "1", "--alphas", "1", "--freqs", "16",
             "--reuse", str(tmp_path / "results" / "digits.json")]
    assert digits_table.main(reuse) == 0
    second = json.loads((again / "results" / "digits.json").read_text())
    assert [row["runs"] for row in second["main"]] == [row["runs"] for row in record["main"]]
    assert all(cell.get("reused") for cell in second["cells"].values())
    assert "results were taken from" in (again / "results" / "digits.md").read_text()
    with pytest.raises(SystemExit, match="--quick run"):  # quick numbers never enter a real table
        digits_table.main(reuse[1:])


def test_mnist_table_quick_writes_the_table_the_figure_and_raw_numbers(tmp_path):
    mnist_table = _load("mnist_table")
    argv = ["--quick", "--out", str(tmp_path), "--ipcs", "1", "10", "--figure-ipcs", "1"]
    assert mnist_table.main(argv) == 0

    page = (tmp_path / "results" / "mnist.md").read_text()
    assert "these numbers mean nothing" in page
    assert f"`uv run python benchmarks/mnist_table.py {' '.join(argv)}`" in page
    for label in ("Random real subset", "Mean matching", "NCFM without psi", "NCFM with psi",
                  "What separates the methods", "seed 1: acc % / distill s", "../images/mnist_ipc1.png"):
        assert label in page, label
    record = json.loads((tmp_path / "results" / "mnist.json").read_text())
    assert [(row["method"], row["ipc"]) for row in record["main"]] == [
        (method, ipc) for ipc in (1, 10) for method in ("random", "mmd", "ncfm_no_psi", "ncfm")]
    for row in record["main"]:
        random_row = next(r for r in record["main"] if r["ipc"] == row["ipc"] and r["method"] == "random")
        assert len(row["runs"]) == 4 and all(0.0 <= acc <= 1.0 for acc in row["runs"])  # 2 repeats x 2 seeds
        assert math.isclose(row["ior"], row["mean"] - random_row["mean"], abs_tol=1e-12)
        assert math.isclose(row["hlr"], record["full"]["mean"] - row["mean"], abs_tol=1e-12)
        if row["method"] != "random":
            assert len(row["distill_seconds_each"]) == 2 and all(s >= 0 for s in row["distill_seconds_each"])
    assert not (tmp_path / "results" / "mnist.partial.json").exists()  # only while it runs
    with Image.open(tmp_path / "images" / "mnist_ipc1.png") as image:  # 10 rows: real, mean matching, NCFM
        assert image.format == "PNG" and image.height > image.width

    again = tmp_path / "again"
    stale = tmp_path / "with_a_stale_cell.json"  # a cell of other settings: not used, not counted, not kept
    stale.write_text(json.dumps({**record, "cells": {**record["cells"], "stale": next(iter(record["cells"].values()))}}))
    reuse = [*argv[:2], str(again), *argv[3:], "--reuse", str(stale), "--name", "variant"]
    assert mnist_table.main(reuse) == 0
    second = json.loads((again / "results" / "variant.json").read_text())
    assert [row["runs"] for row in second["main"]] == [row["runs"] for row in record["main"]]
    assert second["cells"].keys() == record["cells"].keys()
    assert all(cell.get("reused") for cell in second["cells"].values())
    variant_page = (again / "results" / "variant.md").read_text()
    assert "measured results (variant)" in variant_page
    assert f"{len(record['cells'])} of the results were taken from" in variant_page
    assert (again / "images" / "variant_ipc1.png").exists() and not (again / "results" / "mnist.md").exists()


def test_mnist_table_init_noise_reaches_the_runs_and_the_picture_says_so(tmp_path):
    mnist_table = _load("mnist_table")
    argv = ["--quick", "--out", str(tmp_path), "--ipcs", "1", "--seeds", "0", "--figure-ipcs", "1", "--init", "noise"]
    assert mnist_table.main(argv) == 0
    record = json.loads((tmp_path / "results" / "mnist.json").read_text())
    assert record["settings"]["config"]["init"] == "noise"
    distilled = [json.loads(key)[0] for key in record["cells"] if "init" in json.loads(key)[0]]
    assert len(distilled) == 3 and all(config["init"] == "noise" for config in distilled)
    page = (tmp_path / "results" / "mnist.md").read_text()
    assert "init noise" in page and "(uniform noise)" in page


def _row(method: str, ipc: int, mean: float, spread: float):
    kit = _load("kit")
    return kit.RowResult(method, ipc, [mean - spread, mean + spread])  # std == spread


def test_mnist_summary_says_what_separates_and_what_does_not():
    mnist_table = _load("mnist_table")
    rows = [_row("random", 1, 0.50, 0.02), _row("mmd", 1, 0.70, 0.02), _row("ncfm_no_psi", 1, 0.71, 0.02),
            _row("ncfm", 1, 0.75, 0.01),
            _row("random", 10, 0.90, 0.02), _row("mmd", 10, 0.91, 0.01), _row("ncfm_no_psi", 10, 0.912, 0.01),
            _row("ncfm", 10, 0.905, 0.005)]
    ipc1, ipc10 = mnist_table.summary(rows, [1, 10])
    assert ipc1.startswith("- **IPC 1:** every distilled set beats random real images (+20.0, +21.0, +25.0 points)")
    assert "NCFM with psi is above mean matching by +5.0 points" in ipc1 and "without psi" not in ipc1
    assert ipc1.endswith("psi helps (+4.0 points).")
    assert "no distilled set beats random real images beyond the spread (+1.0, +1.2, +0.5 points)" in ipc10
    assert "NCFM does not separate from mean matching (without psi +0.2 points, with psi -0.5 points" in ipc10
    assert ipc10.endswith("psi makes no difference (-0.7 points).")


def test_paper_table_runs_on_fake_data_and_reuses_finished_work(tmp_path):
    paper_table = _load("paper_table")
    store = tmp_path / "store"
    argv = ["--datasets", "fake", "--ipcs", "1", "--iterations", "1", "--quick-pool", "--repeats", "1",
            "--eval-epochs", "1", "--methods", "random", "ncfm", "--store", str(store), "--out", str(tmp_path)]
    assert paper_table.main(argv) == 0
    page = (tmp_path / "results" / "paper.md").read_text()
    assert "## fake" in page and "Random real subset" in page and "NCFM with psi" in page
    record = json.loads((tmp_path / "results" / "paper.json").read_text())
    rows = record["datasets"]["fake"]["rows"]
    assert [row["method"] for row in rows] == ["random", "ncfm"]
    assert record["datasets"]["fake"]["full"]["accuracy"]["runs"]
    assert rows[1]["artifact"] == "fake-ipc1-ncfm@v1" and rows[1]["ran_now"] is True

    # the same command again: the artifact and its evaluation are reused, nothing new is made
    assert paper_table.main(argv) == 0
    again = json.loads((tmp_path / "results" / "paper.json").read_text())["datasets"]["fake"]["rows"]
    assert again[1]["ran_now"] is False and again[1]["runs"] == rows[1]["runs"]
    assert sorted(p.name for p in (store / "artifacts" / "fake-ipc1-ncfm").iterdir() if p.is_dir()) == ["v1"]


def test_main_table_metrics_are_differences_of_fractions(kit):
    rows = [kit.RowResult("random", 1, [0.70, 0.72]), kit.RowResult("ncfm", 1, [0.90, 0.94])]
    table = kit.main_table(rows, [1], {1: 0.71}, 0.99, reference={("ncfm", 1): 49.5})
    ncfm_line = next(line for line in table.splitlines() if line.startswith("| NCFM with psi"))
    cells = [cell.strip() for cell in ncfm_line.strip("|").split("|")]
    assert cells[2] == "92.0 ± 2.0"  # population std of (0.90, 0.94)
    assert cells[4] == "+0.210" and cells[5] == "+0.070"  # IOR = .92 - .71, HLR = .99 - .92
    a = (0.21 - 0.07) / 2
    assert cells[6] == f"{(math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1)):.3f}"
    assert cells[-1] == "49.5"


def _captured_figures(monkeypatch):
    """Keep each figure ncfm_core.plot saves (still written), to read its axes afterwards."""
    import ncfm_core.plot as plot_module

    figures, save = [], plot_module._save

    def keep(fig, path, dpi):
        figures.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plot_module, "_save", keep)
    return figures


def test_line_plot_draws_labelled_axes_and_each_point_where_its_value_says(plots, tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    series = [plots.Series("ncfm", [1.0, 2.0, 4.0], [0.2, 0.5, 0.9], err=[0.05, 0.05, 0.05]),
              plots.Series("random", [1.0, 2.0, 4.0], [0.1, 0.3, 0.4])]
    path = plots.line_plot(series, tmp_path / "plot.png", title="accuracy", x_label="IPC", y_label="test acc",
                           log_x=True, y_range=(0.0, 1.0), size=(300, 200))
    image = Image.open(path).convert("RGB")
    assert image.size == (300, 200)
    (ax,) = figures[0].axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("accuracy", "IPC", "test acc")
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ncfm", "random"]
    first = (31, 119, 180)  # matplotlib's first colour, C0
    for x, y in zip([1.0, 2.0, 4.0], [0.2, 0.5, 0.9]):  # each marker's centre, in pixels (origin bottom left)
        px, py = ax.transData.transform((x, y))
        assert image.getpixel((round(px), round(200 - py))) == first, (x, y)
    px, py = ax.transData.transform((2.0, 0.8))
    assert image.getpixel((round(px), round(200 - py))) != first  # nothing drawn off the line


def test_plots_without_matplotlib_fail_in_one_line_naming_the_extra(plots, tmp_path, monkeypatch):
    from ncfm_core.errors import NcfmError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(NcfmError, match=r"pip install 'ncfm\[plot\]'"):
        plots.line_plot([plots.Series("", [0.0], [1.0])], tmp_path / "p.png", title="t", x_label="x", y_label="y")
    assert not (tmp_path / "p.png").exists()


def test_eval_ranks_runs_one_process_and_torchrun_and_writes_its_page(tmp_path):
    eval_ranks = _load("eval_ranks")
    out = tmp_path / "eval_ranks.md"
    argv = ["--repeats", "2", "--epochs", "1", "--rounds", "1", "--ipc", "1", "--out", str(out)]
    assert eval_ranks.main(argv) == 0
    page = out.read_text()
    assert f"`uv run python benchmarks/eval_ranks.py {' '.join(argv)}`" in page
    rows = [line for line in page.splitlines() if line.startswith("| one process") or line.startswith("| torchrun")]
    assert len(rows) == 2 and all(len(row.split("|")) == 5 for row in rows)  # label, 1 round, median
    assert "Speed-up of 2 processes over one" in page and "largest difference" in page


def test_kit_rounds_table_medians_and_ratio(kit):
    seconds = {"a": [3.0, 1.0, 2.0], "b": [1.0, 1.0, 1.0]}
    assert kit.medians(seconds) == {"a": 2.0, "b": 1.0}
    assert kit.ratio(2.0, 1.0) == "2.00x"
    assert kit.rounds_table("mode", seconds, {"b": "bee"}) == [
        "| mode | round 1 (s) | round 2 (s) | round 3 (s) | median (s) |",
        "|---|---|---|---|---|",
        "| a | 3.00 | 1.00 | 2.00 | 2.00 |",
        "| bee | 1.00 | 1.00 | 1.00 | 1.00 |",
    ]
    assert kit.fmt_seconds(None) == "-" and kit.fmt_seconds(1.23456) == "1.235" and kit.fmt_seconds(12.34) == "12.3"


def test_kit_runs_a_command_and_reads_the_json_it_prints(kit):
    printing = "import json; print('warming up'); print(json.dumps({'a': 1}))"
    seconds, record = kit.run_json([sys.executable, "-c", printing])
    assert record == {"a": 1} and seconds > 0
    assert kit.parse_json_output('{\n  "b": [1, 2]\n}\n') == {"b": [1, 2]}  # an indented document, whole
    with pytest.raises(SystemExit, match="exit code 3"):
        kit.run_command([sys.executable, "-c", "raise SystemExit(3)"], label="three")


@pytest.mark.parametrize("script", ["digits_table", "distill_speed", "eval_ranks", "eval_speed", "paper_table"])
def test_the_benchmarks_keep_the_shared_flags(script, capsys):
    """Docs and GPU check scripts call these flags: the kit's parser parents must keep them."""
    module = _load(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    shown = capsys.readouterr().out
    shared = {"digits_table": ["--device", "--threads", "--seed", "--out", "--repeats"],
              "distill_speed": ["--device", "--threads", "--out", "--gpu-mem", "--ipc", "--iters", "--warmup"],
              "eval_ranks": ["--device", "--out", "--repeats", "--rounds", "--epochs", "--ipc", "--ranks"],
              "eval_speed": ["--device", "--threads", "--out", "--repeats", "--rounds", "--epochs", "--ipc"],
              "paper_table": ["--device", "--seed", "--out", "--repeats", "--gpu-mem"]}[script]
    for flag in shared:
        assert flag in shown, flag


# The GPU machine's Python has neither platformdirs nor mlxtend: a sitecustomize on PYTHONPATH makes
# importing either fail in the check and in every process it starts.
GPU_MACHINE_SITE = """import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("platformdirs", "mlxtend"):
            raise ImportError(f"No module named {name!r} (as on the GPU machine)")
sys.meta_path.insert(0, _Absent())
"""


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    """The GPU acceptance check's CPU-safe form, as CI runs it, without the packages the GPU
    machine lacks: every step passes, the table comes last, the logs are packed."""
    out, site = tmp_path / "check", tmp_path / "gpu_machine"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GPU_MACHINE_SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    assert subprocess.run([sys.executable, "-c", "import platformdirs"], env=env, capture_output=True).returncode == 1
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in steps] == ["cuda-tests", "cifar100-data", "distill", "eval", "export", "inspect",
                                          "speed-authors-2.5G", "speed-authors", "speed-paper", "kernels",
                                          "kernels-2.5G"]
    assert all(s["status"] == "passed" for s in steps), steps
    assert steps[5]["figures"]["images_finite"] is True and steps[5]["figures"]["status"] == "complete"
    assert steps[2]["figures"]["plan_changes"] == 0 and steps[2]["figures"]["estimate"] != "-"  # the memory record
    for speed in steps[6:9]:
        assert speed["figures"]["seconds_per_iteration"] > 0 and speed["figures"]["plan"] != "-", speed
        assert speed["figures"]["cudnn_benchmark"] is False  # a CPU has no cuDNN to tune
    # every variant of the kernels preset at the default plan; under the budget, today's path
    # against the defaults; the first row is the reference
    gpu_check = _load("gpu_check")
    assert list(steps[9]["figures"]) == list(_load("kit").KERNEL_VARIANTS)
    assert list(steps[10]["figures"]) == gpu_check.BUDGET_KERNEL_VARIANTS.split(",")
    assert "compiled in" in steps[9]["figures"]["compile=on"]  # its compile time, apart
    for kernels_step in steps[9:]:
        assert kernels_step["figures"]["today's path"].endswith("(1.00x)")
        assert "fell back" not in " ".join(kernels_step["figures"].values())
    assert done.stdout.rstrip().splitlines()[-1].startswith("| kernels-2.5G | passed |")  # the table is last
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert "logs/distill.log" in archive.getnames()


def test_gpu_check_fails_when_any_step_fails(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    check = gpu_check.Check(tmp_path, device="cpu", smoke=True, budget="2.5G")
    check.steps = [gpu_check.Step("distill", "passed", 1.0), gpu_check.Step("speed", "failed", 2.0, detail="exit 4")]
    assert check.summarise() == 1
    assert "| speed | failed (exit 4) |" in (tmp_path / "summary.md").read_text()
    check.steps = check.steps[:1]
    assert check.summarise() == 0


def test_gpu_check_kernels_step_fails_a_lever_whose_first_loss_is_not_todays(tmp_path, monkeypatch):
    """The kernels steps are where a GPU shows whether each lever computes today's iteration:
    a first loss 5% off today's path fails the step, naming the lever; 0.1% passes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    def finished(losses: dict):
        def run(self, name, argv, timeout):
            figures = {"ablation_order": list(losses), "ablations": {
                variant: {"median_seconds": 1.0, "first_loss": loss, "compile_seconds": None, "fallbacks": []}
                for variant, loss in losses.items()}}
            (self.logs / f"{name}.json").write_text(json.dumps(figures))
            step = gpu_check.Step(name, "passed")
            self.steps.append(step)
            return step, ""
        return run

    check = gpu_check.Check(tmp_path, device="cpu", smoke=True, budget="2.5G")
    monkeypatch.setattr(gpu_check.Check, "run", finished({"today's path": 2.0, "casts=once": 2.002}))
    check.kernels("kernels", None)
    assert check.steps[-1].status == "passed"
    monkeypatch.setattr(gpu_check.Check, "run", finished({"today's path": 2.0, "graphs=on": 2.1, "casts=once": 2.0}))
    check.kernels("kernels", None)
    assert check.steps[-1].status == "failed" and check.steps[-1].detail.endswith("over 1%: graphs=on")


def test_distill_speed_kernels_preset_runs_each_variant_with_its_levers():
    """--ablations kernels: today's path, each lever alone, all of them, the device's defaults,
    today's path again; each variant's distiller runs the levers its kernels option decides to
    (config overrides, decided by the plan as a run's), with its cuDNN autotuning flag."""
    import torch

    from ncfm_core.data import DatasetShape, load_dataset
    from ncfm_core.devices import MemoryBudget
    from ncfm_core.kernels import KernelLevers, decide_levers

    distill_speed, kit = _load("distill_speed"), _load("kit")
    assert distill_speed.KERNEL_ABLATIONS.split(",") == list(kit.KERNEL_VARIANTS)
    names = list(kit.KERNEL_VARIANTS)
    assert names[0] == "today's path" and names[-1] == "today's path (again)"
    assert kit.KERNEL_VARIANTS[names[0]] == kit.KERNEL_VARIANTS[names[-1]] == ("default", False)
    singles = {option for option, _ in kit.KERNEL_VARIANTS.values() if option.count("=") == 1}
    assert {option.split("=")[0] for option in singles} == set(KernelLevers().to_dict())  # every lever alone
    dataset = load_dataset("fake", num_classes=2, train_per_class=4, test_per_class=1)
    spec = dict(classes=2, ipc=1, real_per_class=2, freqs=8)
    for name, (option, autotune) in kit.KERNEL_VARIANTS.items():
        if "compile=on" in option or "graphs=on" in option:
            continue  # built like the others; their loops are tested in test_forward.py and test_graphs.py
        distiller, plan = distill_speed.ablation_distiller(spec, name, dataset, DatasetShape.of(dataset),
                                                           torch.device("cpu"), MemoryBudget())
        assert distiller.levers == decide_levers(option, "cpu") == KernelLevers.from_dict(plan.to_dict()["kernels"])
        assert distill_speed.ABLATIONS[name]["_cudnn_benchmark"] is autotune
    assert decide_levers(kit.KERNEL_VARIANTS["auto (the defaults)"][0], "cpu") == KernelLevers()  # the CPU's


def test_ablation_table_compares_with_the_first_row_and_shows_kernels_and_step_peaks():
    distill_speed = _load("distill_speed")

    def row(seconds: float, cpu: float, kernels: dict, peak: int | None, **extra) -> dict:
        return {"plan": {"real_chunk": 512, "class_chunk": 1, "activation_checkpointing": False}, "precision": "bf16",
                "channels_last": False, "kernels": kernels, "median_seconds": seconds, "median_cpu_seconds": cpu,
                "first_loss": 1.25, "warmup_seconds": [3.0], "step_peak_bytes": peak, **extra}

    table = distill_speed.ablation_table([
        ("today's path", row(1.0, 2.0, {}, 3 * 2**30, cudnn_benchmark=False)),
        ("all levers", row(0.5, 0.5, {"pool": "broadcast", "norm": "batchnorm", "compile": "on"}, 2**30,
                           cudnn_benchmark=True, compile_seconds=12.5, fallbacks=["torch.compile failed"])),
        ("cpu row", row(2.0, 4.0, {"pool": "native", "norm": "groupnorm"}, None)),
    ])
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [c[3] for c in cells] == ["default", "pool=broadcast,norm=batchnorm,compile=on (fell back: torch.compile "
                                     "failed)", "default"]
    assert [c[4] for c in cells] == ["off", "on", "-"]
    assert [c[8] for c in cells] == ["1.00x, 1.00x", "2.00x, 4.00x", "0.50x, 0.50x"]  # first row / this row
    assert [c[9] for c in cells] == ["3.00 GiB", "1.00 GiB", "-"]
    assert [c[12] for c in cells] == ["-", "12.5", "-"]


def test_kernel_speed_times_every_kernel_variant_side_by_side(tmp_path, capsys):
    kernel_speed = _load("kernel_speed")
    record = tmp_path / "kernels.json"
    argv = ["--shapes", "digits", "--batch", "2", "--real-batch", "2", "--rounds", "2", "--json-out", str(record)]
    assert kernel_speed.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]  # after the header
    expected = ["today's path", "pool=broadcast", "pool=reshape", "norm=batchnorm", "casts=once", "layout=nhwc",
                "network levers together", "today's path (again)"]  # the rows a network alone runs
    assert [row.split("|")[1].strip() for row in rows] == list(kernel_speed.network_variants()) == expected
    assert rows[0].split("|")[4].strip() == rows[0].split("|")[6].strip() == "1.00x"  # the first row is the reference
    assert rows[6].split("|")[2].strip() == "pool=broadcast,norm=batchnorm,casts=once,layout=nhwc"
    seconds = json.loads(record.read_text())["seconds"]["digits"]
    assert set(seconds) == set(expected)
    assert all(len(values) == 2 and min(values) > 0 for passes in seconds.values() for values in passes.values())


def test_gpu_check_stays_within_its_time_budget(tmp_path, monkeypatch):
    """No step runs past the check's deadline: a step is cut to the time left, and once none is
    left the remaining steps are skipped (which fails the check) instead of run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    check = gpu_check.Check(tmp_path, device="cpu", smoke=True, budget="2.5G",
                            time_budget=gpu_check.SUMMARY_RESERVE_S + 3)
    step, _ = check.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=60)
    assert step.status == "failed" and "timed out after" in step.detail and step.seconds < 10
    step, _ = check.run("late", [sys.executable, "-c", "pass"], timeout=60)
    assert step.status == "skipped" and "budget" in step.detail
    assert check.summarise() == 1


def test_first_contact_runs_each_trees_readme_command_and_writes_medians_stages_and_margin(tmp_path):
    """The first-contact benchmark, on tiny settings, with this very tree as its own reference."""
    first_contact = _load("first_contact")
    assert first_contact.readme_command(ROOT)[:3] == ["distill", "digits", "--ipc"]  # the README's first command
    out = tmp_path / "first_contact.md"
    out.write_text(f"old figures\n\n{first_contact.KEPT_MARKER}\n\n## Levers\n\nkept text\n")
    tiny = "--iterations 2 --pool-size 1 --pool-epochs 1 --eval-epochs 1 --eval-repeats 1 --width 8"
    assert first_contact.main(["--quick", "--reference", str(ROOT), "--extra", tiny, "--out", str(out)]) == 0
    page = out.read_text()
    assert "--reference REF_DIR" in page and str(ROOT) not in page  # no machine path on the page
    assert "a test of this script, not a measurement" in page and "- load: " in page
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith(("| this tree", "| reference"))]
    assert len(rows) == 2 and all(len(row) == 13 for row in rows), rows
    for row in rows:  # wall, stages and longest silence are seconds; this README's command has a margin
        assert float(row[2].strip("*")) > 0 and float(row[-1].rstrip(" |")) > 0
        assert row[-2].endswith("points") and row[-4].endswith("%")
    assert "Speed-up over the reference (ratio of the median wall times" in page
    profile = page.split("## Where the time goes")[1]  # one more run, under cProfile
    for stage in ("pool training", "distillation loop", "evaluations"):
        assert f"| {stage} (`" in profile, profile
    assert "built-in method torch.conv2d" in profile or "run_backward" in profile
    assert page.endswith(f"{first_contact.KEPT_MARKER}\n\n## Levers\n\nkept text\n")  # the hand-written part stays
    assert "old figures" not in page
