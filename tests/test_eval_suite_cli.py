"""``ncfm eval`` as an evaluation suite: protocol knobs, baselines (random subset, cached full
data), fair metrics, soft labels, several models, the manifest's eval history; tiny digits."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from cli_runner import error_line, invoke, one_json, one_thread

from ncfm_cli.output import GlobalOptions, ProgressRenderer
from ncfm_core.evaluate import PROTOCOLS
from ncfm_core.jobs import eval as eval_jobs
from ncfm_core.store import Store

# A 1-network pool trained for one epoch (the soft-label teacher), 3 iterations, no multi-formation.
DISTILL = ["distill", "digits", "--ipc", "1", "--factor", "1", "--iterations", "3", "--pool-size", "1",
           "--pool-epochs", "1", "--freqs", "16", "--real-per-class", "4", "--width", "8"]
# Width-8 ConvNets for one epoch keep even the full-data baseline (1,257 images) well under a second.
EVAL = ["eval", "digits-ipc1", "--epochs", "1", "--repeats", "2", "--width", "8"]
BOTH = ["--baseline", "random", "--baseline", "full"]
DIGITS_TRAIN = 1257


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny artifact evaluated once with both baselines (which fills the baseline cache)."""
    with one_thread():
        store = tmp_path_factory.mktemp("suite_store")
        invoke("--store", store, "--json", *DISTILL)
        first = one_json(invoke("--store", store, *EVAL, *BOTH, "--json"))
    return {"store": store, "first": first}



def _fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _cache_file(store: Path, record: dict) -> Path:
    return store / "baselines" / f"{record['baselines']['full']['cache_key']}.json"


def _no_full_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the full-data baseline was trained although it is cached")

    monkeypatch.setattr(eval_jobs, "evaluate_full_baseline", refuse)


# ----------------------------------------------------------------------------- JSON and metrics


def test_json_carries_accuracy_baselines_metrics_and_protocol(made):
    out = made["first"]
    for key, kind in {"artifact": str, "path": str, "protocol": dict, "accuracy": dict, "baselines": dict,
                      "metrics": dict, "seconds": float, "device": str, "created": str, "timings": dict,
                      "seeds": list, "passed": bool}.items():
        assert isinstance(out.get(key), kind), f"{key}: {out.get(key)!r}"
    assert "models" not in out and out["teacher"] is None and out["model"] == "convnet"
    protocol = out["protocol"]
    assert protocol["protocol"] == "quick" and protocol["epochs"] == 1 and protocol["repeats"] == 2  # digits' default
    assert protocol["width"] == 8 and protocol["soft_labels"] is False and out["seeds"] == [0, 1]

    results = {"synthetic": out, **out["baselines"]}
    assert set(results) == {"synthetic", "random", "full"}
    for name, result in results.items():
        accuracy = result["accuracy"]
        assert len(accuracy["runs"]) == 2 and all(_fraction(r) for r in accuracy["runs"]), name
        assert accuracy["mean"] == pytest.approx(sum(accuracy["runs"]) / 2, abs=1e-12), name
        assert accuracy["std"] == pytest.approx(abs(accuracy["runs"][0] - accuracy["runs"][1]) / 2, abs=1e-12)

    random_subset, full = out["baselines"]["random"], out["baselines"]["full"]
    # Same storage: the synthetic set stores 1 image per class, so does the random subset.
    assert random_subset["train_set"] == {"kind": "random", "ipc": 1, "subset_seed": 0, "size": 10}
    assert "same storage" in random_subset["subset"] and random_subset["subset_seed"] == 0
    assert out["train_set"]["stored"] == 10 and full["train_set"]["size"] == DIGITS_TRAIN
    assert full["cached"] is False and full["cache_key"].startswith("full-convnet-")

    syn, rnd, ful = out["accuracy"]["mean"], random_subset["accuracy"]["mean"], full["accuracy"]["mean"]
    metrics = out["metrics"]
    assert metrics["ior"] == syn - rnd and metrics["hlr"] == ful - syn  # exactly, from the reported numbers
    a = (metrics["ior"] - metrics["hlr"]) / 2
    expected_lrs = (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))
    assert metrics["lrs"] == pytest.approx(expected_lrs, abs=1e-12) and 0.0 <= metrics["lrs"] <= 1.0


def test_manifest_eval_history_holds_the_whole_record(made):
    out = made["first"]
    history = Store(made["store"]).resolve("digits-ipc1").record().evals
    stored = history[0].to_json()
    assert stored == {k: v for k, v in out.items() if k not in ("artifact", "path", "min_acc", "passed")}


def test_human_output_is_a_table_of_mean_and_std_with_the_metrics(store_copy):
    text = invoke("--store", store_copy, *EVAL, *BOTH).stdout
    for fragment in ("synthetic (10 stored)", "random real (1/class, seed 0)", "full training set", "+-",
                     "cached", "IOR", "HLR", "LRS", "pts", "final-epoch accuracy"):
        assert fragment in text, text


def test_best_over_epochs_is_labelled_and_never_the_reported_accuracy(store_copy):
    result = invoke("--store", store_copy, *EVAL, "--epochs", "2", "--baseline", "random", "--best-over-epochs")
    assert "TEST-SET MODEL SELECTION" in result.stdout and "not the reported figure" in result.stdout
    out = one_json(invoke("--store", store_copy, *EVAL, "--epochs", "2", "--baseline", "random",
                          "--best-over-epochs", "--json"))
    for result in (out, out["baselines"]["random"]):
        best = result["best_over_epochs_test_acc"]
        assert "selected on the test set" in best["note"]
        assert all(b >= r for b, r in zip(best["runs"], result["accuracy"]["runs"]))  # runs stay final-epoch
    assert out["protocol"]["best_over_epochs"] is True


# ----------------------------------------------------------------------------- the full-data cache


def test_second_call_reuses_the_cached_full_baseline(made, store_copy, monkeypatch):
    first = made["first"]
    _no_full_training(monkeypatch)
    again = one_json(invoke("--store", store_copy, *EVAL, *BOTH, "--json"))
    full = again["baselines"]["full"]
    assert full["cached"] is True and full["cache_key"] == first["baselines"]["full"]["cache_key"]
    assert full["accuracy"] == first["baselines"]["full"]["accuracy"]
    # Same seed on CPU: the synthetic set and the random subset give the same runs again.
    assert again["accuracy"] == first["accuracy"]
    assert again["baselines"]["random"]["accuracy"] == first["baselines"]["random"]["accuracy"]
    assert again["metrics"] == first["metrics"]
    # The key covers the protocol: another epoch count is another baseline, so it must train.
    failed = invoke("--store", store_copy, *EVAL, "--epochs", "2", "--baseline", "full", expect=1)
    assert "cached" in failed.stderr and "trained although" in failed.stderr


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not json")


def _not_an_object(path: Path) -> None:
    path.write_text("[1, 2]")


def _tampered_runs(path: Path) -> None:
    cached = json.loads(path.read_text())
    cached["accuracy"]["runs"][0] = 1.0  # mean no longer matches
    path.write_text(json.dumps(cached))


def _other_protocol(path: Path) -> None:
    cached = json.loads(path.read_text())
    cached["protocol"]["lr"] = 0.5
    path.write_text(json.dumps(cached))


@pytest.mark.parametrize("damage", [_garbage, _not_an_object, _tampered_runs, _other_protocol])
def test_corrupt_cache_file_is_recomputed_with_a_warning(made, store_copy, damage, monkeypatch):
    first = made["first"]
    cache = _cache_file(store_copy, first)
    damage(cache)
    result = invoke("--store", store_copy, *EVAL, "--baseline", "full", "--json")
    out = one_json(result)
    assert "warning:" in result.stderr and "recomputing" in result.stderr and str(cache) in result.stderr
    full = out["baselines"]["full"]
    assert full["cached"] is False
    assert full["accuracy"] == first["baselines"]["full"]["accuracy"]  # recomputed: the same numbers
    # ... and written back valid, so the next call reads it.
    _no_full_training(monkeypatch)
    assert one_json(invoke("--store", store_copy, *EVAL, "--baseline", "full", "--json"))[
        "baselines"]["full"]["cached"] is True


# ----------------------------------------------------------------------------- soft labels, models, knobs


def test_soft_labels_use_the_artifacts_pool_and_record_the_teacher(store_copy):
    record = Store(store_copy).resolve("digits-ipc1").record()
    out = one_json(invoke("--store", store_copy, *EVAL, *BOTH, "--soft-labels", "--temperature", "2", "--json"))
    teacher = out["teacher"]
    assert teacher["pool"] == record.pool.key and teacher["member"] == 0
    assert teacher["pool_cached"] is True and teacher["temperature"] == 2.0 and "KL" in teacher["loss"]
    assert _fraction(teacher["test_accuracy"])
    assert out["protocol"]["soft_labels"] is True and out["protocol"]["temperature"] == 2.0
    assert out["protocol"]["teacher_pool"] == teacher["pool"]
    assert set(out["baselines"]) == {"random", "full"} and set(out["metrics"]) == {"ior", "hlr", "lrs"}
    # The teacher is part of the protocol, so the soft-label full baseline is its own cache entry.
    hard_key = one_json(invoke("--store", store_copy, *EVAL, "--baseline", "full", "--json"))[
        "baselines"]["full"]["cache_key"]
    assert out["baselines"]["full"]["cache_key"] != hard_key


def test_several_models_give_per_model_results(store_copy):
    # convnet_bn (batch norm) stands in for the larger architectures: same code path, cheaper on CPU.
    result = invoke("--store", store_copy, *EVAL, "--model", "convnet", "--model", "convnet_bn",
                    "--baseline", "random", "--json")
    out = one_json(result)
    assert set(out["models"]) == {"convnet", "convnet_bn"} and out["model"] == "convnet"  # JSON keys are sorted
    for name, entry in out["models"].items():
        assert entry["model"] == name and entry["protocol"]["model"] == name
        assert len(entry["accuracy"]["runs"]) == 2 and all(_fraction(r) for r in entry["accuracy"]["runs"])
        assert entry["baselines"]["random"]["train_set"]["size"] == 10
        random_mean = entry["baselines"]["random"]["accuracy"]["mean"]
        assert entry["metrics"] == {"ior": entry["accuracy"]["mean"] - random_mean}
    assert out["accuracy"] == out["models"]["convnet"]["accuracy"]  # the top level is the first model
    assert out["models"]["convnet"]["accuracy"] != out["models"]["convnet_bn"]["accuracy"]
    human = invoke("--store", store_copy, *EVAL, "--model", "convnet,convnet_bn", "--baseline", "random").stdout
    assert human.count("convnet_bn") >= 3, human  # its results rows and its metrics row


def test_protocol_options_reach_the_recorded_protocol(store_copy):
    out = one_json(invoke(
        "--store", store_copy, *EVAL, "--protocol", "dsa", "--optimizer", "AdamW", "--lr", "0.05",
        "--batch-size", "32", "--weight-decay", "0", "--momentum", "0.5", "--cutmix-prob", "0.25", "--rrc",
        "--repeat-mode", "batched", "--seed", "3", "--json",
    ))
    protocol = out["protocol"]
    assert protocol["protocol"] == "dsa" and protocol["schedule"] == "half_tenth"  # the dsa preset stays
    assert (protocol["optimizer"], protocol["lr"], protocol["batch_size"]) == ("adamw", 0.05, 32)
    assert (protocol["weight_decay"], protocol["momentum"], protocol["cutmix_prob"]) == (0.0, 0.5, 0.25)
    assert protocol["random_resized_crop"] is True and protocol["repeat_mode"] == "batched"
    assert out["training"] == "batched" and out["seeds"] == [3, 4]
    assert out["baselines"] == {} and out["metrics"] == {}


@pytest.mark.parametrize("args, fragment", [
    (["--baseline", "half"], "unknown baseline"),
    (["--model", "convnet", "--model", "lenet"], "unknown network"),
    (["--model", "convnet_bn", "--repeat-mode", "batched"], "cannot train its repeats batched"),
    (["--repeat-mode", "parallel"], "unknown repeat_mode (--repeat-mode)"),
    (["--optimizer", "lion"], "unknown optimizer"),
    (["--temperature", "2"], "--soft-labels"),
    (["--soft-labels", "--teacher-member", "3"], "teacher_member (--teacher-member) 3"),
    (["--soft-labels", "--temperature", "0"], "temperature"),
])
def test_bad_options_are_one_line_usage_errors_before_any_training(store_copy, args, fragment):
    result = invoke("--store", store_copy, *EVAL, *args, expect=2)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert len(Store(store_copy).resolve("digits-ipc1").record().evals) == 1  # nothing recorded


def test_min_acc_exit_5_applies_to_the_synthetic_mean(store_copy):
    result = invoke("--store", store_copy, *EVAL, "--baseline", "random", "--min-acc", "1", "--json", expect=5)
    out = one_json(result)
    assert out["passed"] is False and out["min_acc"] == 1.0 and "ior" in out["metrics"]
    assert "below --min-acc" in result.stderr.strip().splitlines()[-1]
    assert Store(store_copy).resolve("digits-ipc1").record().evals[-1].accuracy.to_json() == out["accuracy"]


def test_progress_names_each_set_and_stays_off_stdout(store_copy):
    loud = invoke("--store", store_copy, "-v", *EVAL, *BOTH)
    for fragment in ("eval convnet: network 2/2", "random convnet: network 1/2", "baseline full: reusing"):
        assert fragment in loud.stderr, loud.stderr
    assert "network 1/2" not in loud.stdout
    quiet = invoke("--store", store_copy, "--quiet", *EVAL, "--baseline", "random")
    assert quiet.stderr == "" and "random real" in quiet.stdout


def test_help_documents_every_option_and_the_json_shape():
    text = " ".join(invoke("eval", "--help").stdout.replace("\u2502", " ").split())  # drop rich's box rules
    for option in ("--protocol", "--epochs", "--lr", "--batch-size", "--optimizer", "--weight-decay", "--momentum",
                   "--cutmix-prob", "--rrc", "--no-rrc", "--seed", "--repeats", "--repeat-mode",
                   "--best-over-epochs", "--soft-labels", "--temperature", "--teacher-member", "--model",
                   "--baseline", "--baseline-seed", "--min-acc", "--device", "--width"):
        assert option in text, option
    assert "ncfm eval digits-ipc10 --baseline random --baseline full" in text
    assert "metrics {ior, hlr, lrs}" in text and "TEST-SET MODEL SELECTION" in text


# ----------------------------------------------------------------------------- progress and defaults


EPOCH_LINE = re.compile(
    r"^(eval|random) convnet: network ([12])/2 epoch (\d+)/10 \((\d+)% of 2 networks\) loss \d+\.\d{4}"
    r"(, mean of 1 trained \d+\.\d\d%)?, ETA .+$"
)


def test_without_a_terminal_eval_prints_epoch_lines_with_accuracy_so_far_and_eta(store_copy):
    """A log (CI, nohup) sees each network's epochs every tenth of the evaluation, with the mean
    accuracy of the networks trained so far and an ETA, then each network's accuracy."""
    result = invoke("--store", store_copy, "eval", "digits-ipc1", "--epochs", "10", "--repeats", "2", "--width", "8",
                    "--baseline", "random")
    lines = [line for line in result.stderr.splitlines() if " epoch " in line]
    assert lines and all(EPOCH_LINE.match(line) for line in lines), result.stderr
    for subject in ("eval", "random"):
        matches = [EPOCH_LINE.match(line) for line in lines if line.startswith(subject)]
        # 2 networks x 10 epochs: a line every 2 network-epochs (10%), never more often
        assert [int(m.group(4)) for m in matches] == list(range(10, 101, 10)), lines
        assert [(int(m.group(2)), int(m.group(3))) for m in matches] == [(1, e) for e in (2, 4, 6, 8, 10)] + [
            (2, e) for e in (2, 4, 6, 8, 10)]
        assert all(bool(m.group(5)) == (m.group(2) == "2") for m in matches)  # accuracy so far: after network 1
    assert "eval convnet: network 1/2 accuracy" in result.stderr
    assert not any(EPOCH_LINE.match(line) for line in result.stdout.splitlines())  # progress stays off stdout
    assert "ETA 0.0 s" in lines[9] and "(100% of 2 networks)" in lines[9]


def test_eval_epoch_lines_come_every_minute_for_slow_networks():
    clock = {"now": 0.0}
    with ProgressRenderer(GlobalOptions()) as renderer:
        renderer.clock = lambda: clock["now"]
        shown = []
        renderer._log = lambda message, level="info": shown.append(message)
        for epoch in range(1000):  # one network, 25 s an epoch: a tenth takes 41 min
            clock["now"] += 25.0
            renderer({"stage": "eval_epoch", "what": "synthetic", "model": "convnet", "first": 0, "stop": 1,
                      "repeats": 1, "epoch": epoch, "epochs": 1000, "loss": 1.0, "seconds": 25.0})
            if epoch == 10:
                break
    # 3 epochs (75 s) after the first event, then 3 more, never sooner
    assert [line.split(" epoch ")[1].split(" ")[0] for line in shown] == ["4/1000", "7/1000", "10/1000"]
    assert shown[0].endswith("ETA 6 h 55 min")  # 996 epochs left at 25 s


def test_batched_repeats_report_their_epochs_together():
    with ProgressRenderer(GlobalOptions()) as renderer:
        shown = []
        renderer._log = lambda message, level="info": shown.append(message)
        for epoch in range(4):
            renderer({"stage": "eval_epoch", "what": "random", "model": "convnet", "first": 0, "stop": 3,
                      "repeats": 3, "epoch": epoch, "epochs": 4, "loss": 0.5, "seconds": 1.0})
    assert [line.split(" (")[0] for line in shown] == [f"random convnet: networks 1-3/3 epoch {e}/4"
                                                       for e in (1, 2, 3, 4)]


def test_digits_default_to_the_quick_protocol_and_the_paper_is_one_flag_away(store_copy):
    quick = one_json(invoke("--store", store_copy, "eval", "digits-ipc1", "--epochs", "1", "--repeats", "1", "--json"))
    assert quick["protocol"]["protocol"] == "quick" and quick["protocol"]["width"] == PROTOCOLS["quick"]["width"]
    paper = one_json(invoke("--store", store_copy, "eval", "digits-ipc1", "--protocol", "ncfm", "--epochs", "1",
                            "--repeats", "1", "--json"))
    assert paper["protocol"]["protocol"] == "ncfm" and paper["protocol"]["width"] == 128
    text = invoke("--store", store_copy, "eval", "digits-ipc1", "--epochs", "1", "--repeats", "1").stdout
    assert "protocol    quick:" in text, text


def test_distill_eval_takes_the_evaluation_options_of_eval(tmp_path):
    """--eval-width, --eval-seed and --eval-baseline reach the evaluation; the result says which
    protocol ran and the margin over random real images."""
    args = ["--store", tmp_path, *DISTILL, "--eval-width", "8", "--eval-epochs", "2", "--eval-repeats", "2",
            "--eval-seed", "5", "--eval-baseline", "random"]
    out = one_json(invoke(*args, "--json"))
    record = out["eval"]
    assert record["protocol"]["protocol"] == "quick" and record["protocol"]["width"] == 8
    assert record["seeds"] == [5, 6] and record["protocol"]["epochs"] == 2
    assert record["metrics"]["ior"] == record["accuracy"]["mean"] - record["baselines"]["random"]["accuracy"]["mean"]
    text = invoke(*args).stdout
    for fragment in ("protocol quick: 2 x convnet width 8, 2 epochs on cpu", "random real",
                     "margin (IOR)", "points over random real images"):
        assert fragment in text, text


def test_distill_checks_eval_baselines_before_distilling(tmp_path):
    result = invoke("--store", tmp_path, *DISTILL, "--eval-baseline", "fulll", expect=2)
    assert "unknown baseline 'fulll'" in error_line(result)
    assert not (tmp_path / "artifacts").exists()
