"""The physios' workspace in a real browser (headless system Chromium through Playwright) against the real app.

The clinic is the simulated one (``tests/integration/clinic.py``): every scenario's garment through the real
broker, ingester and InfluxDB, evaluated by the monitor, e-mails to a real SMTP server. A physio signs in and lands
on Today; the problem patients come first and the compliant ones last; she opens a patient, reads the evidence of
each open episode, acknowledges one with a note, which Today, the audit trail and a colleague then show; snoozes
another; a new urgent episode still alerts. At 390 px nothing overflows; axe-core finds no serious violation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, expect, sync_playwright

from devices.registry import schemas as s
from devices.registry.service import SYSTEM
from tests.integration.clinic import PASSWORD, PHYSIO1, PHYSIO2, Clinic, signed_in
from tests.integration.test_monitor_e2e import write_lines

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking"]  # fmt: skip
SHOTS = Path("/tmp/workspace-shots")
# Scenarios whose patient is on track at the end of the fleet's period (no open episode).
ON_TRACK = {"compliant", "boot_compliant", "clock_skew", "bad_firmware", "offline_backfill"}
SERIOUS = {"serious", "critical"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium (scripts/bootstrap lists it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, clinic: Clinic) -> Iterator[Page]:
    context = browser.new_context(base_url=clinic.url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(20_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def login(page: Page, email: str = PHYSIO1, path: str = "/ui/login") -> None:
    page.goto(path)
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()


def shots(page: Page, name: str) -> None:
    """Full-page screenshots at a desktop's and a phone's width (looked at while building the pages)."""
    SHOTS.mkdir(exist_ok=True)
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 900})


def order(page: Page) -> list[tuple[str, int]]:
    """(patient, need) of Today's rows, top to bottom."""
    rows = page.locator("table.today tbody tr")
    return [(str(rows.nth(i).get_attribute("data-patient")), int(rows.nth(i).get_attribute("data-need") or 0))
            for i in range(rows.count())]  # fmt: skip


def test_today_lists_the_problem_patients_first_and_the_compliant_last(page: Page, clinic: Clinic) -> None:
    login(page)
    expect(page).to_have_url(f"{clinic.url}/ui/workspace/")  # Today is where a physio lands
    expect(page.get_by_role("heading", level=1)).to_contain_text("Today")
    page.get_by_role("link", name="Whole clinic").click()
    rows = order(page)
    assert {p for p, _ in rows} == set(clinic.scenario)
    needs = [n for _, n in rows]
    assert needs == sorted(needs, reverse=True)
    first_fine = next(i for i, (_, n) in enumerate(rows) if n == 0)
    problems = [clinic.scenario[p] for p, _ in rows[:first_fine]]
    fine = [clinic.scenario[p] for p, _ in rows[first_fine:]]
    assert problems[0] == "boot_overpressure"  # the urgent one on top
    assert set(fine) <= ON_TRACK and set(problems).isdisjoint(ON_TRACK)
    top = page.locator("table.today tbody tr").first
    expect(top).to_contain_text("URGENT")
    expect(top).to_contain_text("Boot over-pressure")
    expect(top).to_contain_text("Not yet acknowledged")
    shots(page, "today")


def test_a_patient_page_shows_the_evidence_of_each_open_episode(page: Page, clinic: Clinic) -> None:
    login(page)
    page.get_by_role("link", name="Whole clinic").click()
    for scenario in ("boot_overpressure", "rolled_down"):
        code = clinic.by_scenario[scenario]
        page.goto(f"/ui/workspace/patients/{code}")
        expect(page.get_by_role("heading", level=1)).to_contain_text(code)
        cards = page.locator("article.episode-card")
        assert cards.count() >= 1
        for i in range(cards.count()):
            expect(cards.nth(i).locator(".evidence .headline")).to_contain_text("mmHg" if scenario != "under_use"
                                                                                 else "h")  # fmt: skip
        assert not re.search(r"\bmmhg\b", page.locator("body").inner_text()), "the unit is written mmHg"
        shots(page, f"patient-{scenario}")
    urgent = page.locator("article.episode-card").first
    page.goto(f"/ui/workspace/patients/{clinic.by_scenario['boot_overpressure']}")
    expect(urgent.locator(".evidence .headline")).to_contain_text("chamber reached")
    expect(urgent.locator(".evidence")).to_contain_text("Suggested next step")


def in_thread(work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on an event loop of its own (Playwright's sync API holds this thread's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work()).result()


def episode_ids(page: Page) -> list[int]:
    cards = page.locator("article.episode-card")
    return [int(str(cards.nth(i).get_attribute("id")).removeprefix("episode-")) for i in range(cards.count())]


def test_acknowledge_with_a_note_shows_on_today_in_the_audit_trail_and_to_a_colleague(
        browser: Browser, page: Page, clinic: Clinic) -> None:  # fmt: skip
    code = clinic.by_scenario["boot_overpressure"]
    note = "Called the client: pump programme reset to 60 mmHg, no numbness; next session tomorrow."
    login(page)
    page.get_by_role("link", name="Whole clinic").click()
    page.get_by_role("link", name=code).click()
    card = page.locator("article.episode-card").first
    expect(card).to_contain_text("Boot over-pressure")
    card.get_by_label("Acknowledge, with what you did (optional)").fill(note)
    card.get_by_role("button", name="Acknowledge").click()
    expect(page.get_by_role("status")).to_contain_text(f"Acknowledged by Demo Physio 1: {note}")
    expect(page.locator("article.episode-card").first.locator(".actions-done")).to_contain_text(note)
    expect(page.locator("table.audit")).to_contain_text("acknowledge episode")

    page.get_by_role("link", name="← Today").click()
    page.get_by_role("link", name="Whole clinic").click()
    row = page.locator(f"tr[data-patient='{code}']")
    expect(row).to_contain_text("Acknowledged by Demo Physio 1")
    entries = [e for e in clinic.registry.patient_audit(SYSTEM, code) if e.entity == "episode"]
    assert [e.action for e in entries] == ["acknowledge"]
    assert entries[0].actor.startswith(PHYSIO1) and entries[0].changes["note"] == note

    colleague = browser.new_context(base_url=clinic.url, viewport={"width": 1400, "height": 900})
    try:
        other = colleague.new_page()
        login(other, PHYSIO2)
        other.get_by_role("link", name="Whole clinic").click()
        expect(other.locator(f"tr[data-patient='{code}']")).to_contain_text("Acknowledged by Demo Physio 1")
        other.goto(f"/ui/workspace/patients/{code}")
        expect(other.locator("article.episode-card").first).to_contain_text(note)
    finally:
        colleague.close()


def test_a_snoozed_episode_does_not_silence_a_new_urgent_one(page: Page, clinic: Clinic) -> None:
    code = clinic.by_scenario["boot_short_sessions"]
    login(page)
    page.goto(f"/ui/workspace/patients/{code}")
    until = (datetime.now(ZoneInfo(clinic.truth["timezone"])).date() + timedelta(days=7)).isoformat()
    for episode in episode_ids(page):
        card = page.locator(f"#episode-{episode}")
        card.get_by_label("Snooze until").fill(until)
        card.get_by_label("Reason").fill("on holiday this week; sessions resume on return")
        card.get_by_role("button", name="Snooze").click()
        expect(page.get_by_role("status")).to_contain_text("Snoozed until")
    page.goto("/ui/workspace/?scope=all")
    expect(page.locator(f"tr[data-patient='{code}']")).to_contain_text("Snoozed until")
    assert dict(order(page))[code] == 50  # snoozed: below every episode nobody has handled

    # The pump over-inflates now: a new urgent episode opens and is e-mailed at once, whatever was snoozed.
    device = next(p["device_id"] for p in clinic.truth["patients"] if p["patient"] == code)
    now = datetime.now(UTC)
    tags = f"clinic=demo-clinic,device={device},patient={code}"
    start = int((now - timedelta(minutes=6)).timestamp() * 1e9)
    lines = [f'event,{tags},type=session_start count=1i,planned_s=1500i,program="lymphedema" {start}']
    lines += [f"sample,{tags},kind=boot ankle_mmhg=88.0,calf_mmhg=84.0,foot_mmhg=97.5,worn=true,worn_s=2.0,"
              f"seq={9000 + i}i {start + i * 60 * 10**9}" for i in range(5)]  # fmt: skip
    write_lines(clinic.influx.url, clinic.database, lines)
    before = len(clinic.smtp.received())
    in_thread(clinic.monitor.safety_once)
    in_thread(clinic.monitor.send_due)
    mails = clinic.smtp.received()[before:]
    urgent = [m for m in mails if str(m.message["Subject"]).startswith(f"[URGENT] Boot over-pressure: {code}")]
    assert len(urgent) == 1, [str(m.message["Subject"]) for m in mails]
    page.goto("/ui/workspace/?scope=all")
    row = page.locator(f"tr[data-patient='{code}']")
    expect(row).to_contain_text("URGENT")
    expect(row.locator(".episode").first).to_contain_text("Not yet acknowledged")
    assert dict(order(page))[code] == 600


def test_an_urgent_episode_cannot_be_snoozed_and_a_refused_save_marks_its_field(page: Page, clinic: Clinic) -> None:
    code = clinic.by_scenario["rolled_down"]
    login(page)
    page.goto(f"/ui/workspace/patients/{code}")
    episode = episode_ids(page)[0]
    card = page.locator(f"#episode-{episode}")
    yesterday = (datetime.now(ZoneInfo(clinic.truth["timezone"])).date() - timedelta(days=1)).isoformat()
    card.get_by_label("Snooze until").fill(yesterday)
    card.get_by_label("Reason").fill("waiting for the new stockings")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        card.get_by_role("button", name="Snooze").click()
    assert posted.value.status == 422
    field = page.locator(f"#until-{episode}")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(page.locator(f"#err-{episode}-until")).to_contain_text("the date is in the past")
    expect(field).to_have_value(yesterday)  # what was typed stays, to be corrected
    expect(page.locator(f"#reason-{episode}")).to_have_value("waiting for the new stockings")
    shots(page, "patient-refused")

    urgent = clinic.by_scenario["boot_overpressure"]
    page.goto(f"/ui/workspace/patients/{urgent}")
    expect(page.locator("article.episode-card").first.get_by_label("Snooze until")).to_have_count(0)
    csrf = page.locator("input[name=csrf]").first.input_value()
    response = page.request.post(f"/ui/workspace/episodes/{episode_ids(page)[0]}/actions", max_redirects=0,
                                 form={"csrf": csrf, "kind": "snooze", "until": (date.today() + timedelta(days=2))
                                       .isoformat(), "note": "busy"})  # fmt: skip
    assert response.status == 422 and "cannot be snoozed" in response.text()
    forged = page.request.post(f"/ui/workspace/episodes/{episode_ids(page)[0]}/actions", max_redirects=0,
                               form={"csrf": "0" * 64, "kind": "note", "note": "forged"})  # fmt: skip
    assert forged.status == 403


def overflow(page: Page) -> int:
    """How far the page is wider than the window (0: nothing overflows)."""
    return int(page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


def test_nothing_overflows_at_390_px_and_axe_finds_no_serious_violation(page: Page, clinic: Clinic) -> None:
    login(page)
    axe = Axe()
    paths = ["/ui/workspace/?scope=all", *(f"/ui/workspace/patients/{clinic.by_scenario[s]}"
                                           for s in ("boot_overpressure", "rolled_down", "silent"))]  # fmt: skip
    found: dict[str, list[str]] = {}
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        for path in paths:
            page.goto(path)
            assert overflow(page) <= 0, f"{path} overflows at {width} px by {overflow(page)} px"
            results = axe.run(page)
            serious = [v for v in results.response["violations"] if v.get("impact") in SERIOUS]
            found[f"{path} @ {width}"] = [f"{v['id']}: {v['help']} ({len(v['nodes'])})" for v in serious]
    assert {where: v for where, v in found.items() if v} == {}


def test_an_e_mails_link_leads_through_sign_in_to_the_patients_page(page: Page, clinic: Clinic) -> None:
    code = clinic.by_scenario["too_tight"]
    page.goto(f"/ui/workspace/patients/{code}#episode-1")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("E-mail").fill(PHYSIO2)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{clinic.url}/ui/workspace/patients/{code}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(code)


def test_a_contraindication_that_conflicts_with_the_prescription_is_shown_first(page: Page, clinic: Clinic) -> None:
    code = clinic.by_scenario["boot_compliant"]
    today = datetime.now(ZoneInfo(clinic.truth["timezone"])).date()
    clinic.registry.add_contraindication(SYSTEM, s.ContraindicationIn(patient=code, kind="untreated_dvt",
                                                                      noted_on=today, note="left calf"))  # fmt: skip
    login(page)
    page.goto(f"/ui/workspace/patients/{code}")
    alert = page.get_by_role("region", name="Contraindication and current prescription conflict")
    expect(alert).to_contain_text("untreated deep-vein thrombosis: compression may dislodge the clot")
    expect(alert).to_contain_text("Boot: 7 sessions/week")
    box = alert.bounding_box()
    charts = page.get_by_role("heading", name="Charts").bounding_box()
    assert box is not None and charts is not None and box["y"] < charts["y"]  # above the episodes and charts


def test_the_patient_page_offers_the_monthly_report(clinic: Clinic) -> None:
    """Issue 14's button: on the workspace's patient page, the month's report as PDF (and CSV) for that patient."""
    code = clinic.by_scenario["under_use"]
    client = signed_in(clinic.url)
    try:
        page = client.get(f"/ui/workspace/patients/{code}")
        assert page.status_code == 200
        assert f'action="/ui/records/patients/{code}/report.pdf"' in page.text
        month = re.search(r'name="month" type="month" value="(\d{4}-\d{2})"', page.text)
        assert month is not None
        pdf = client.get(f"/ui/records/patients/{code}/report.pdf", params={"month": month.group(1)})
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    finally:
        client.close()
