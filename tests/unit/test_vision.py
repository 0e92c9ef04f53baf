"""The shipped image-check model and the check around it (no wires)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.pipeline.decision import DecisionInputs, ImageOutcome, LaneClass, ReaderOutcome, VerdictLookup, decide
from agent.vision.check import CLASSES, INPUT_SIZE, Classifier, ModelError, VisionCheck, _interpreter_class, preprocess
from hw_sim.xray import render, write_png

MODELS = Path(__file__).resolve().parents[2] / "models"
INT8 = MODELS / "xray_int8.tflite"
THRESHOLDS = dict.fromkeys(CLASSES[1:], 0.5)


def test_shipped_model_is_full_integer_int8() -> None:
    interp = _interpreter_class()(model_path=str(INT8), num_threads=1)
    interp.allocate_tensors()
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    assert tuple(inp["shape"]) == (1, INPUT_SIZE, INPUT_SIZE, 3) and tuple(out["shape"]) == (1, len(CLASSES))
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    assert in_scale > 0 and 0 <= in_zero <= 255
    assert 0 < out_scale <= 1 / 200 and 0 <= out_zero <= 255  # softmax 0..1 over 256 steps
    # every weight and activation tensor is 8-bit (biases are int32, as TFLite's int8 scheme has them)
    kinds = {np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    assert kinds <= {"int8", "uint8", "int32"}, kinds
    weights = [t for t in interp.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) == 4]
    assert weights and all(t["quantization_parameters"]["scales"].size >= 1 for t in weights)
    assert INT8.stat().st_size < 1_000_000


def test_missing_or_corrupt_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        Classifier(tmp_path / "nope.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="not a usable TFLite model"):
        Classifier(bad)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(INT8.read_bytes()[:2000])
    with pytest.raises(ModelError):
        Classifier(truncated)


def test_classifier_finds_each_item_and_passes_clean_parcels() -> None:
    model = Classifier(INT8)
    for k, label in enumerate(CLASSES):
        scores = model.scores(preprocess(render(20_000_000 + k, label)))
        assert scores.shape == (len(CLASSES),) and abs(float(scores.sum()) - 1) < 0.05
        assert CLASSES[int(scores.argmax())] == label, (label, scores)


async def test_check_results_missing_late_corrupt_flagged_pass(tmp_path: Path) -> None:
    check = VisionCheck(INT8, THRESHOLDS, tmp_path / "kept", keep_max_mb=1)
    try:
        assert (await check.check(None, 1.0)).status == "missing"
        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
        failed = await check.check(str(corrupt), 1.0)
        assert failed.status == "failed" and "unreadable" in (failed.detail or "")
        blade = tmp_path / "blade.png"
        write_png(str(blade), render(20_000_010, "blade"))
        late = await check.check(str(blade), 0.0)
        assert late.status == "failed" and "late" in (late.detail or "")
        flagged = await check.check(str(blade), 2.0)
        assert flagged.status == "flagged" and flagged.top_class == "blade"
        # a check begun when the image was tied to its parcel: its result counts if it is in by the
        # deadline, however little time is left when the parcel asks
        started = check.start(str(blade))
        assert started.result(timeout=10).status == "flagged"
        assert (await check.check(str(blade), 0.0, started)) == started.result()
        running = check.start(str(blade))
        assert (await check.check(str(blade), 2.0, running)).status == "flagged"
        kept = await check.after(flagged, str(blade), "S-L-7-1234", consume=True)
        assert kept and Path(kept).exists() and not blade.exists()
        clean = await check.check(render(20_000_011, "clean"), 2.0)  # a frame from a capture source
        assert clean.status == "pass"
    finally:
        check.close()


def test_kept_images_rotate_within_the_budget(tmp_path: Path) -> None:
    check = VisionCheck(INT8, THRESHOLDS, tmp_path / "kept", keep_max_mb=1)
    try:
        img = (np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
        for i in range(8):  # ~270 KB each as PNG
            assert check.keep(img, f"n{i}")
        files = list((tmp_path / "kept").rglob("*.png"))
        assert sum(f.stat().st_size for f in files) <= 1024 * 1024
        assert any(f.name == "n7.png" for f in files) and not any(f.name == "n0.png" for f in files)
    finally:
        check.close()


@pytest.mark.parametrize("status", ["missing", "failed", "flagged"])
def test_no_release_without_a_passed_image_when_required(status: str) -> None:
    base = {"reads": (ReaderOutcome("r", ("RB123456785GB",)),), "accept_formats": ("s10",),
            "verdict": VerdictLookup("hit", "release", "v")}
    assert decide(DecisionInputs(image=ImageOutcome(True, status), **base)).lane is LaneClass.INSPECTION  # type: ignore[arg-type]
    assert decide(DecisionInputs(image=ImageOutcome(True, "pass"), **base)).lane is LaneClass.RELEASE  # type: ignore[arg-type]
    # advisory: recorded, never blocking
    assert decide(DecisionInputs(image=ImageOutcome(False, status), **base)).lane is LaneClass.RELEASE  # type: ignore[arg-type]


def test_render_is_deterministic_and_realistic_in_shape() -> None:
    a, b = render(5, "firearm"), render(5, "firearm")
    assert a.dtype == np.uint8 and a.shape == (128, 128, 3) and np.array_equal(a, b)
    assert not np.array_equal(render(5, "clean"), render(6, "clean"))
    assert asyncio.iscoroutinefunction(VisionCheck.check)


async def test_capture_source_hands_over_a_frame_after_each_trigger(tmp_path: Path) -> None:
    """A camera or stream, here a video file OpenCV writes itself, through VideoCapture."""
    import cv2

    from agent.vision.check import CaptureSource

    video = tmp_path / "belt.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (128, 128))
    assert writer.isOpened()
    for i in range(50):
        writer.write(cv2.cvtColor(render(30_000_000 + i, "blade"), cv2.COLOR_RGB2BGR))
    writer.release()
    frames: list[np.ndarray] = []
    source = CaptureSource(str(video), delay_s=0.05, on_image=lambda frame, t: frames.append(frame))
    task = asyncio.create_task(source.run())
    try:
        for _ in range(100):  # wait until the reader thread has a frame
            if source._latest is not None:
                break
            await asyncio.sleep(0.02)
        for _ in range(3):
            source.on_trigger()
            await asyncio.sleep(0.1)
        assert len(frames) == 3 and frames[0].shape == (128, 128, 3)
        check = VisionCheck(INT8, THRESHOLDS, tmp_path / "kept", keep_max_mb=1)
        try:
            assert (await check.check(frames[0], 2.0)).status == "flagged"  # MJPEG-compressed, still a blade
        finally:
            check.close()
    finally:
        task.cancel()


def test_lines_without_image_checks_never_load_opencv_or_litert() -> None:
    """Footprint: an agent with [vision] mode = "off" must not pay for OpenCV and LiteRT."""
    import subprocess
    import sys

    code = "import sys, agent.service.runtime, agent.cli; print(sorted(m for m in ('cv2', 'ai_edge_litert', 'tflite_runtime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
