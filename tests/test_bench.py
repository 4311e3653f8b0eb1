"""The ``inplace-abn bench`` tool at a tiny size: it runs every variant, InPlace-ABN keeps less for
backward than BatchNorm + activation, and the JSON output has its fields."""

import json

import pytest

from inplace_abn import cli
from inplace_abn.tools import bench



@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")  # no torch.compile time


@pytest.fixture(scope="module")
def tiny_run():
    """Every default variant on a thin DeepLabV3 + ResNet-18 at 32x32, and the progress messages."""
    progress = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INPLACE_ABN_BACKEND", "eager")
        results = bench.run_benchmark("deeplabv3_resnet18", 2, 32, width_multiplier=1 / 16, steps=1, warmup=0,
                                      device="cpu", progress=progress.append)
    return results, progress


def test_run_benchmark_inplace_abn_keeps_less_than_standard(tiny_run):
    results, progress = tiny_run
    by_variant = {result.variant: result for result in results}
    assert list(by_variant) == list(bench.DEFAULT_VARIANTS)
    standard, in_place = by_variant["standard"], by_variant["inplace_abn"]
    assert in_place.saved_bytes < 0.6 * standard.saved_bytes
    assert by_variant["inplace_activation"].saved_bytes < standard.saved_bytes
    assert by_variant["checkpoint"].saved_bytes < standard.saved_bytes
    assert standard.saved_ratio == 1.0 and standard.time_ratio == 1.0
    assert all(result.step_time_s > 0 and result.error is None for result in results)
    assert in_place.saved_ratio == pytest.approx(in_place.saved_bytes / standard.saved_bytes)
    assert in_place.max_batch_size is None  # the search runs on a GPU only
    assert any("InPlace-ABN" in message for message in progress)
    table = bench.format_table(results)
    assert "InPlace-ABN" in table and "step ms (CPU)" in table


def test_cli_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = cli.main(["bench", "--network", "resnet18", "--batch-size", "2", "--crop", "32", "--width-multiplier",
                     "0.0625", "--steps", "1", "--warmup", "0", "--device", "cpu", "--variants", "standard",
                     "inplace_abn", "--json", str(path)])
    assert code == 0
    assert "BatchNorm + act" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert {"settings", "environment", "results"} <= set(report)
    assert [row["variant"] for row in report["results"]] == ["standard", "inplace_abn"]
    fields = {"network", "batch_size", "crop", "width_multiplier", "device", "step_time_s", "peak_step_bytes",
              "peak_total_bytes", "saved_bytes", "memory_ratio", "saved_ratio", "time_ratio", "max_batch_size",
              "max_crop", "error"}
    for row in report["results"]:
        assert fields <= set(row)
    standard, in_place = report["results"]
    assert in_place["saved_bytes"] < standard["saved_bytes"]


def test_plot(tmp_path, tiny_run):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.plot(tiny_run[0], str(path))
    assert path.stat().st_size > 0


@pytest.mark.parametrize("limit_value", [1, 5, 37, 64, 100])
def test_largest_fitting_finds_the_threshold(limit_value):
    probes = []

    def fits(value):
        probes.append(value)
        return value <= limit_value

    assert bench._largest_fitting(fits, start=4, unit=1, limit=1000) == limit_value
    assert len(probes) < 20


def test_largest_fitting_in_units_and_when_nothing_fits():
    assert bench._largest_fitting(lambda crop: crop <= 700, start=224, unit=32, limit=8192) == 672
    assert bench._largest_fitting(lambda crop: False, start=224, unit=32, limit=8192) is None
