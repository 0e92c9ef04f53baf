"""The image check on the line: images from a scanner folder, the shipped model, over real wires."""

from __future__ import annotations

from pathlib import Path

import pytest

from hw_sim.broker import Mosquitto
from hw_sim.harness import RunSpec, run_line
from hw_sim.plan import Mix, make_plan

pytestmark = pytest.mark.integration


async def test_hidden_items_are_caught_and_flagged_images_kept(broker: Mosquitto, line_name: str) -> None:
    plan = make_plan(60, rate=8, seed=41, mix=Mix(hidden_item=0.1, reader_misread=0.0))
    run, m = await run_line(RunSpec(plan=plan, line=line_name, rate=8, images=True), broker=broker, keep=True)
    try:
        assert m["hidden_items"] == 6
        assert m["hidden_items_released"] == 0 and m["hidden_items_caught"] == 6
        assert m["wrongly_released"] == 0 and m["records_published"] == 60
        records = run.central.records_by_seq()  # type: ignore[union-attr]
        odd = [(seq, r["image"]["status"], r["image"]["detail"]) for seq, r in records.items()
               if (r.get("image") or {}).get("status") in ("missing", "failed")]
        assert m["image_missing_or_failed"] == 0, odd  # the records say which and why
        for t in run.truth:
            rec = records[t.tracked.seq]  # type: ignore[union-attr]
            image = rec["image"]
            assert image["model_version"].startswith("xray-cnn-") and image["status"] in ("pass", "flagged")
            if t.planned.hidden_item:
                assert image["status"] == "flagged" and "image_flagged" in rec["decision"]["reasons"]
                assert image["class"] == t.planned.item
                assert Path(image["path"]).exists()  # kept for the officers' review
        # nothing is left in the scanner folder: checked images are consumed
        assert not list(run.scan_dir.glob("*.png"))
    finally:
        run.cleanup()


async def test_missing_late_and_corrupt_images_never_release(broker: Mosquitto, line_name: str) -> None:
    plan = make_plan(40, rate=6, seed=42, mix=Mix(reader_misread=0.0))
    releasable = [p.index for p in plan.parcels if p.expected_lane == "release" and p.index > 5][:6]
    faults = dict(zip(releasable, ["missing", "corrupt", "late"] * 2, strict=True))
    spec = RunSpec(plan=plan, line=line_name, rate=6, images=True, image_faults=faults)
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        records = run.central.records_by_seq()  # type: ignore[union-attr]
        for index, fault in faults.items():
            t = run.truth[index]
            rec = records[t.tracked.seq]  # type: ignore[union-attr]
            assert t.reached == "inspection", (fault, rec["image"])
            expected = {"missing": "missing", "late": "missing", "corrupt": "failed"}[fault]
            assert rec["image"]["status"] == expected, (fault, rec["image"])
            assert {"image_missing", "image_failed"} & set(rec["decision"]["reasons"])
        # every other release-verdict parcel with a clean image was released
        others = [t for t in run.truth if t.planned.expected_lane == "release" and t.planned.index not in faults]
        assert others and all(t.reached == "release" for t in others)
        assert '"image arrived after the parcel was decided; not used"' in run.agent_log.read_text()
        assert not list(run.scan_dir.glob("*.png"))  # late images are discarded too, not left behind
    finally:
        run.cleanup()


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
async def test_missing_or_corrupt_model_stops_start_up(broker: Mosquitto, line_name: str, tmp_path: Path, kind: str) -> None:
    model = tmp_path / "xray_int8.tflite"
    if kind == "corrupt":
        model.write_bytes(b"TFL3" + b"\x00" * 1000)
    spec = RunSpec(parcels=5, line=line_name, images=True, model=model)
    with pytest.raises(RuntimeError) as err:
        await run_line(spec, broker=broker)
    text = str(err.value)
    assert "agent exited with 2" in text and "vision.model" in text and str(model) in text
