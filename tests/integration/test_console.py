"""The local web console in a real headless browser (Debian's chromium, driven by Playwright; no
browser download) against a running simulated line: what a viewer, a customs officer and a
technician see and may do. Screenshots go to $SORTGATE_SCREENSHOTS (docs/console to refresh the
committed ones), else to the test's temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.console.users import add_user
from hw_sim.broker import Mosquitto
from hw_sim.console_load import ConsoleProcess, free_port
from hw_sim.harness import LineRun, RunSpec, run_line
from hw_sim.plan import Mix, make_plan

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "line-password-1"


def _wait(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Visitors(threading.Thread):
    """A viewer, an officer and a technician at their browsers while the line runs."""

    def __init__(self, run: LineRun, port: int, shots: Path) -> None:
        super().__init__(name="visitors", daemon=True)
        self.run_, self.port, self.shots = run, port, shots
        self.base = f"http://127.0.0.1:{port}"
        self.out: dict[str, Any] = {}
        self.console: ConsoleProcess | None = None

    def run(self) -> None:
        try:
            _wait(lambda: (self.run_.state_dir / "control.sock").exists(), 60, "the agent's control socket")
            self.console = ConsoleProcess(self.run_.config_path, self.port, self.run_.dir / "console.log")
            self.console.start()
            self._browse()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost on this thread
            self.out["error"] = repr(exc)
        finally:
            if self.console:
                self.console.stop()

    def _login(self, browser: Any, user: str) -> Any:
        ctx = browser.new_context(viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        page.on("dialog", lambda d: d.accept())  # the gate test's "are you sure"
        page.goto(self.base + "/")
        assert page.url.startswith(self.base + "/login"), "an exposed console asks for a login first"
        page.fill("input[name=user]", user)
        page.fill("input[name=password]", PASSWORD)
        page.click("#login")
        page.wait_for_url(self.base + "/")
        return page

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"))

    def _browse(self) -> None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                self._viewer(browser)
                self._technician(browser)
                self._officer(browser)
            finally:
                browser.close()

    def _viewer(self, browser: Any) -> None:
        page = self._login(browser, "vera")
        # parcels appear live: rows, then a newer first row without reloading the page
        page.wait_for_selector("#parcels tbody tr", timeout=30_000)
        first = page.get_attribute("#parcels tbody tr", "data-record")
        # (polled from here: the console's CSP forbids the eval that wait_for_function would need)
        _wait(lambda: page.get_attribute("#parcels tbody tr", "data-record") != first, 20, "a newer parcel")
        self.out["live"] = (first, page.get_attribute("#parcels tbody tr", "data-record"))
        self.out["line_text"] = page.inner_text("main")
        self.shot(page, "line")
        page.goto(self.base + "/readers")
        page.wait_for_selector("#frames tbody tr", timeout=10_000)
        self.out["readers_text"] = page.inner_text("#readers")
        self.shot(page, "readers")
        page.goto(self.base + "/alarms")
        page.wait_for_selector("#active tbody tr", timeout=10_000)
        self.shot(page, "alarms")
        page.goto(self.base + "/stats")
        page.wait_for_selector("body[data-charts=drawn]", timeout=15_000)
        self.shot(page, "stats")
        page.goto(self.base + "/commissioning")
        self.out["viewer_buttons"] = page.locator("#fire, #maint-on").count()
        # a viewer cannot fire a gate even by crafting the request (with the right CSRF token)
        token = page.get_attribute("body", "hx-headers").split('"')[3]
        r = page.request.post(self.base + "/actions/gate", form={"gate": "1"}, headers={"X-CSRF-Token": token})
        self.out["viewer_fire"] = (r.status, r.text())
        page.context.close()

    def _technician(self, browser: Any) -> None:
        page = self._login(browser, "theo")
        # a POST without the CSRF token is refused, whoever sends it
        r = page.request.post(self.base + "/actions/maintenance", form={"state": "on"})
        self.out["no_csrf"] = (r.status, r.text())
        page.goto(self.base + "/commissioning")
        page.click("#maint-on")
        page.wait_for_selector("#mode-result .result", timeout=10_000)
        self.out["maint_on"] = page.inner_text("#mode-result")
        time.sleep(0.5)  # the controller shows MAINTENANCE at its next scan
        page.select_option("#gate", "1")
        page.click("#fire")
        page.wait_for_selector("#gate-result .result", timeout=10_000)
        self.out["fire"] = page.inner_text("#gate-result")
        self.out["gate_fires"] = [g for _, g in self.run_.model.gate_fires]
        self.out["config_state"] = page.inner_text("#config-state")
        page.wait_for_selector("#mode-now:has-text('maintenance')", timeout=5_000)  # live from the agent
        self.shot(page, "commissioning")
        page.click("#maint-off")
        page.wait_for_selector("#mode-result .result:has-text('normal')", timeout=10_000)
        self.out["maint_off"] = page.inner_text("#mode-result")
        page.context.close()

    def _officer(self, browser: Any) -> None:
        page = self._login(browser, "olga")
        # a waybill search shows the whole chain of its parcel
        central = self.run_.central
        assert central is not None
        rec = _wait(lambda: next((r for r in list(central.records.values())
                                  if r.get("waybill") and r["result"]["disposition"] == "sorted"), None),
                    30, "a recorded parcel with a waybill")
        page.goto(self.base + "/parcels")
        page.fill("#q", rec["waybill"])
        page.click("#search")
        page.click(f"#results a[href='/parcels/{rec['record_id']}']")
        page.wait_for_selector("#chain")
        self.out["chain"] = (rec, page.inner_text("#chain"))
        self.shot(page, "parcel")
        page.goto(self.base + f"/parcels?q={rec['waybill']}")
        self.shot(page, "parcels")
        # a flagged parcel's image and scores: one with a waybill, for the bench below (the image
        # check may also flag a parcel whose label was not read, which no waybill finds)
        flagged = _wait(lambda: next((r for r in reversed(list(central.records.values()))
                                      if (r.get("image") or {}).get("status") == "flagged" and r.get("waybill")),
                                     None), 60, "a flagged parcel with a waybill")
        flagged_href = f"/parcels/{flagged['record_id']}"
        page.goto(self.base + "/review")
        _wait(lambda: page.reload() or page.locator(f"#flagged a.tile[href='{flagged_href}']").count() > 0, 30,
              "its image in the review")
        self.shot(page, "review")
        page.goto(self.base + flagged_href)
        page.wait_for_selector("#xray")
        _wait(lambda: page.locator("#xray").evaluate("img => img.complete && img.naturalWidth") > 0, 10, "the image")
        self.out["flagged"] = (flagged_href, page.inner_text("#image-check"), page.inner_text("#reasons"))
        waybill = page.inner_text("#waybill")
        # the officer at the bench scans the waybill, sees why, records the finding
        page.goto(self.base + "/bench")
        page.fill("#waybill-input", waybill)
        page.click("#look")
        page.wait_for_selector("#why")
        self.out["why"] = page.inner_text("#why")
        page.select_option("#outcome", "seized")
        page.fill("#note", "knife found in the side pocket")
        page.click("#record-finding")
        page.wait_for_selector("#finding-result .result", timeout=10_000)
        self.out["finding"] = page.inner_text("#finding-result")
        self.shot(page, "bench")
        self.out["finding_rid"] = flagged_href.removeprefix("/parcels/")
        _wait(lambda: central.findings, 15, "the finding on MQTT")
        page.goto(self.base + flagged_href)
        self.out["chain_findings"] = page.inner_text("#findings")
        page.context.close()


async def test_console_in_a_real_browser(broker: Mosquitto, line_name: str, tmp_path: Path) -> None:
    assert CHROMIUM, "Debian's chromium is missing: tools/setup.sh installs it (apt-get install chromium)"
    shots = Path(os.environ.get("SORTGATE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    users = tmp_path / "console.users"
    for name, role in (("vera", "viewer"), ("olga", "officer"), ("theo", "technician")):
        add_user(users, name, role, PASSWORD)
    port = free_port()
    plan = make_plan(700, 8, seed=5, speed_mps=3.0, readers=1, mix=Mix(reader_misread=0.0, hidden_item=0.12))
    spec = RunSpec(parcels=700, rate=8, seed=5, plan=plan, line=line_name, images=True,
                   extra_config=f'[console]\nport = {port}\nusers_file = "{users}"\n')
    visitors: list[Visitors] = []

    def progress(run: LineRun) -> None:
        if not visitors:
            visitors.append(Visitors(run, port, shots))
            visitors[0].start()

    run, m = await run_line(spec, broker=broker, on_progress=progress, keep=True)
    try:
        v = visitors[0]
        v.join(60)
        out = v.out
        assert "error" not in out, out.get("error") + "\n" + (run.dir / "console.log").read_text()[-3000:]
        first, later = out["live"]
        assert first and later and first != later
        assert "healthy" in out["line_text"] and "BELT_RUNNING" in out["line_text"]
        assert "reader1" in out["readers_text"] and "open" in out["readers_text"]
        assert out["viewer_buttons"] == 0
        assert out["viewer_fire"][0] == 403 and "viewer may not gate" in out["viewer_fire"][1]
        assert out["no_csrf"][0] == 403 and "CSRF" in out["no_csrf"][1]
        assert "mode maintenance" in out["maint_on"]
        assert "gate 1 fired" in out["fire"] and out["gate_fires"] == [1]  # the simulator saw it, once
        assert "mode normal" in out["maint_off"]
        assert "the agent runs this file" in out["config_state"]
        rec, chain = out["chain"]
        for part in (rec["record_id"], rec["waybill"], rec["decision"]["lane_class"], rec["result"]["disposition"],
                     ", ".join(rec["decision"]["reasons"]), "delivered"):
            assert part in chain, (part, chain)
        _, image_check, reasons = out["flagged"]
        assert image_check.startswith("flagged") and "top class" in image_check and "model" in image_check
        assert "image_flagged" in reasons
        assert "image_flagged" in out["why"]
        assert "finding seized recorded" in out["finding"]
        assert "seized by olga: knife found in the side pocket" in out["chain_findings"]
        assert run.central is not None
        (finding,) = run.central.findings
        schema = json.loads((Path(__file__).resolve().parents[2] / "docs/schemas/finding.schema.json").read_text())
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(finding)
        assert finding["schema"] == "sortgate.finding/1" and finding["outcome"] == "seized"
        assert finding["parcel_record_id"] == out["finding_rid"] and finding["officer"] == "olga"
        audits = [(a["action"], a.get("via")) for a in run.central.alarms if a.get("alarm") == "audit"]
        assert ("login", "console") in audits and ("fire_gate", "console") in audits
        assert ("set_mode", "console") in audits
        assert m["wrongly_released"] == 0 and m["records_published"] == m["parcels"]
        for name in ("line", "readers", "alarms", "stats", "parcels", "parcel", "review", "bench", "commissioning"):
            assert (shots / f"{name}.png").stat().st_size > 10_000
    finally:
        run.cleanup()
