"""examples/bench_gpu.py: its JSON keys and table (a micro run here; --quick as a slow test)."""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import bench_gpu  # noqa: E402

KEYS = {"raw_images_per_s", "dataset_images_per_s", "max_pixel_diff_levels", "ti_steps_per_s",
        "imagenet_ipc10_gpu_hours", "device", "max_fingerprint_drift", "drift", "builder_seconds_per_class",
        "imagenet_ipc10_seconds_per_class", "peak_rss_gib", "mode", "settings", "ti_steps_per_s_default_batch"}

MICRO = replace(bench_gpu.QUICK, resolution=16, steps=1, raw_batches=(1, 2), raw_calls_at_1=1, classes=26, ipc=8,
                render_batch=4, dataset_images=4, ti_batch=2, ti_steps=1, build_ipc=1, build_ti_steps=1,
                build_max_images=2)


def check_result(r: dict, batches) -> None:
    assert KEYS <= set(r), KEYS - set(r)
    assert set(r["raw_images_per_s"]) == {str(b) for b in batches}
    assert all(v > 0 for v in r["raw_images_per_s"].values()) and r["dataset_images_per_s"]["eager"] > 0
    # the CPU renders at one fixed batch shape: no drift whatever the batch size or batch-mates
    assert r["max_pixel_diff_levels"] == 0 and r["max_fingerprint_drift"] == 0
    assert set(r["drift"]) == {"batch8_one_class", "batch8_mixed_classes", "batch32_mixed_classes"}
    assert set(r["builder_seconds_per_class"]) == {"select", "invert", "label"}
    assert r["ti_steps_per_s"] > 0 and r["imagenet_ipc10_gpu_hours"] > 0
    assert r["device"].startswith("CPU")


def test_micro_run_has_every_json_key_and_a_table(tmp_path):
    r = bench_gpu.run(MICRO, tmp_path, "micro", log=lambda m: None)
    check_result(r, MICRO.raw_batches)
    json.dumps(r)  # serialisable as written
    text = bench_gpu.table(r)
    assert "| raw pipeline, batch 2 (img/s)" in text and "ImageNet-1k IPC10 (GPU-hours)" in text


def test_imagenet_extrapolation_scales_each_stage_to_the_builder_defaults():
    from builder.patches import PatchSettings
    from builder.settings import STABLE_DIFFUSION

    s = replace(bench_gpu.FULL, build_max_images=20, build_ipc=5, steps=30)
    hours = bench_gpu.imagenet_hours({"select": 2.0, "invert": 99.0, "label": 3.0}, 4.0, s)
    want = {"select": 2.0 * PatchSettings().max_images / 20, "invert": STABLE_DIFFUSION.ti_steps / 4.0,
            "label": 3.0 * 10 / 5 * STABLE_DIFFUSION.steps / 30}
    assert hours["seconds_per_class"] == pytest.approx(want)
    assert hours["gpu_hours"] == pytest.approx(sum(want.values()) * 1000 / 3600)


@pytest.mark.slow
def test_quick_mode_runs_on_the_cpu_in_under_3_minutes(tmp_path):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_gpu.py"), "--quick", "--out",
                          str(tmp_path / "q.json")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.perf_counter() - t0 < 180
    r = json.loads((tmp_path / "q.json").read_text())
    check_result(r, bench_gpu.QUICK.raw_batches)
    assert "| D3MDataset.materialize(), eager (img/s)" in out.stdout
