"""Memory sizes and memory probes of ``ncfm_core.devices``: ``--gpu-mem`` specs, precision
resolution, and the cap / peak / free-memory helpers on this machine."""

import pytest
import torch

from ncfm_core.config import make_config
from ncfm_core.devices import (
    cap_device_memory,
    detect_memory,
    measure_peak,
    parse_memory,
    resolve_precision,
)
from ncfm_core.errors import ConfigError

GiB, MiB = 2**30, 2**20


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, total, expected",
    [
        ("2.5G", None, int(2.5 * GiB)),
        ("800M", None, 800 * MiB),
        ("1.5GiB", None, int(1.5 * GiB)),
        ("512MB", None, 512 * 10**6),
        ("2gb", None, 2 * 10**9),
        (" 64 k ", None, 64 * 1024),
        ("1Ti", None, 2**40),
        ("1048576", None, 1048576),
        ("1e3", None, 1000),
        ("0.3", 1000, 300),
        (".5", 8 * GiB, 4 * GiB),
        ("1", 12345, 12345),
        ("3B", None, 3),
    ],
)
def test_parse_memory_reads_sizes_and_fractions(spec, total, expected):
    assert parse_memory(spec, total) == expected


@pytest.mark.parametrize(
    "spec, total, message",
    [
        ("lots", None, "cannot read"),
        ("", None, "cannot read"),
        ("-1G", None, "cannot read"),
        ("2.5X", None, "cannot read"),
        ("G", None, "cannot read"),
        ("0", 100, "positive"),
        ("0G", None, "positive"),
        ("1.5", 100, "fraction must lie in"),
        ("0.3", None, "total memory is unknown"),
        ("0.1B", None, "less than one byte"),
    ],
)
def test_parse_memory_rejects_garbage_nonpositive_and_bad_fractions(spec, total, message):
    with pytest.raises(ConfigError, match=message):
        parse_memory(spec, total)


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="--precision"):
        make_config("fake", 1, precision="fp64")


# -- probes -----------------------------------------------------------------------------------


def test_device_helpers_on_cpu():
    assert cap_device_memory("cpu", GiB) is None
    peak = measure_peak("cpu")
    assert peak.rss_bytes and peak.rss_bytes > 10 * MiB and "RSS" in peak.source
    assert peak.to_dict()["peak_bytes"] == peak.rss_bytes
    free, total = detect_memory("cpu")
    assert 0 < free <= (total or free)
