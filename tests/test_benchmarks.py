"""The results scripts run end to end on tiny settings and write what the docs link to; their
table arithmetic and the PIL plot are checked against hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import math
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


def test_nice_ticks_are_round_and_cover_the_range(plots):
    assert plots._nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert plots._nice_ticks(62.3, 97.8) == [70.0, 80.0, 90.0]  # step 10: 35.5 / 4 rounded up
    assert plots._nice_ticks(0.013, 0.0451) == [0.02, 0.03, 0.04]
    assert plots._nice_ticks(-3.0, 3.0) == [-2.0, 0.0, 2.0]  # 6 / 4 = 1.5, rounded up to a step of 2


def test_line_plot_puts_each_point_where_its_value_says(plots, tmp_path):
    path = plots.line_plot([plots.Series("", [0.0, 1.0], [0.0, 1.0])], tmp_path / "plot.png", title="t",
                         x_label="x", y_label="y", y_range=(0.0, 1.0), size=(300, 200))
    image = Image.open(path).convert("RGB")
    left, right, top, bottom = 70, 20, 36, 56
    plot_w, plot_h = 300 - left - right, 200 - top - bottom
    pad = 0.04  # the x axis is padded by 4% of the data range on both sides
    x_of = lambda v: left + (v + pad) / (1 + 2 * pad) * plot_w  # noqa: E731
    y_of = lambda v: top + (1 - v) * plot_h  # noqa: E731
    blue = plots._COLOURS[0]
    for value in (0.0, 0.5, 1.0):  # both end markers and the line's midpoint
        x, y = round(x_of(value)), round(y_of(value))
        assert image.getpixel((x, y)) == blue, (value, image.getpixel((x, y)))
    assert image.getpixel((round(x_of(0.5)), round(y_of(0.9)))) != blue  # nothing drawn off the line


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


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    """The GPU acceptance check's CPU-safe form, as CI runs it: every step passes, the table
    comes last, the logs are packed."""
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in steps] == ["cuda-tests", "cifar100-data", "distill", "eval", "export", "inspect",
                                          "speed", "speed-2.5G"]
    assert all(s["status"] == "passed" for s in steps), steps
    assert steps[5]["figures"]["images_finite"] is True and steps[5]["figures"]["status"] == "complete"
    assert done.stdout.rstrip().splitlines()[-1].startswith("| speed-2.5G | passed |")  # the table is last
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
