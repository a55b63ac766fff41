"""The physios' web page in a real browser: headless system Chromium driven by Playwright, against the real app.

The app runs under uvicorn on a free loopback port (a thread of this process) over
a SQLite registry in a temporary folder, seeded through the Registry service. What
the browser changes is checked through a second Registry over its own engine, so
the assertions read the database, not the server's objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine

from compression.localservers import free_port
from devices.registry import schemas as s
from devices.registry.api import create_app
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.models import utcnow
from devices.registry.service import SYSTEM, Registry
from devices.registry.settings import RegistrySettings

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
# Browsers cannot be downloaded here: Playwright drives Debian's Chromium. --no-sandbox because tests may run as
# root in a container; --disable-dev-shm-usage because /dev/shm is small there.
LAUNCH_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking"]  # fmt: skip
SCREENSHOT = Path("/tmp/registry-patient.png")

CLINIC = "bowvalley"
ANN, ANN_PASSWORD = "ann@bowvalley.example", "ann-password-2026"
BOB, BOB_PASSWORD = "bob@bowvalley.example", "bob-password-2026"
CLEO, CLEO_PASSWORD = "cleo@bowvalley.example", "orchard-gate-2026"  # changes her password
ALICE, CARL, DORA = "BV-0001", "BV-0002", "BV-0003"  # Alice and Carl are Ann's patients, Dora is Bob's
WEAR_TARGET = "Daily wear target (hours/day)"


@dataclass(frozen=True, slots=True)
class Site:
    """The running page and what was seeded."""

    url: str
    check: Registry  # its own engine: reads what the server wrote to the file
    sock_rx: int  # Alice's sock prescription (8 h/day)
    boot_rx: int  # Carl's boot prescription (contraindicated since it was written)


def _seed(registry: Registry, today_in_clinic: datetime) -> tuple[int, int]:
    today = today_in_clinic.date()
    clinic = s.ClinicIn(code=CLINIC, name="Bow Valley Physiotherapy", timezone="America/Edmonton")
    registry.create_clinic(SYSTEM, clinic)
    for email, name, password in ((ANN, "Ann Lee", ANN_PASSWORD), (BOB, "Bob Roy", BOB_PASSWORD),
                                  (CLEO, "Cleo Park", CLEO_PASSWORD)):  # fmt: skip
        registry.create_physio(SYSTEM, s.PhysioIn(clinic=CLINIC, name=name, email=email, password=password))
    for code, name, physio in ((ALICE, "Alice Example", ANN), (CARL, "Carl Example", ANN), (DORA, "Dora Example", BOB)):
        registry.create_patient(SYSTEM, s.PatientIn(clinic=CLINIC, code=code, display_name=name, physio=physio))
    registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id="gw-bowvalley-1", clinic=CLINIC, description="front desk"))
    registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-0001", clinic=CLINIC, kind="sock", firmware="1.4.2",
                                              gateway="gw-bowvalley-1"))  # fmt: skip
    registry.create_device(SYSTEM, s.DeviceIn(device_id="boot-0001", clinic=CLINIC, kind="boot", firmware="2.0.1"))
    since = utcnow() - timedelta(days=2)
    registry.assign(SYSTEM, s.AssignmentIn(device_id="sock-0001", patient=ALICE, valid_from=since))
    registry.assign(SYSTEM, s.AssignmentIn(device_id="boot-0001", patient=CARL, valid_from=since))
    sock = registry.prescribe(SYSTEM, s.PrescriptionIn(
        patient=ALICE, garment_kind="sock", valid_from=today - timedelta(days=7), class_system="ral", class_name="2",
        wear_hours_per_day=8))  # fmt: skip
    boot = registry.prescribe(SYSTEM, s.PrescriptionIn(
        patient=CARL, garment_kind="boot", valid_from=today - timedelta(days=7), sessions_per_week=5,
        session_min_minutes=30, session_max_minutes=45, max_chamber_mmhg=60))  # fmt: skip
    # Recorded after the boot was prescribed: any change to it now needs an override.
    registry.add_contraindication(SYSTEM, s.ContraindicationIn(patient=CARL, kind="untreated_dvt", noted_on=today,
                                                               note="left calf, scan booked"))  # fmt: skip
    return sock.id, boot.id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    url = f"sqlite:///{tmp_path_factory.mktemp('registry-web') / 'registry.db'}"
    engines: list[Engine] = [make_engine(url), make_engine(url)]
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        migrate(engines[0])
        registry = Registry(session_factory(engines[0]))
        sock_rx, boot_rx = _seed(registry, datetime.now(ZoneInfo("America/Edmonton")))
        port = free_port()
        app = create_app(registry, RegistrySettings(database_url=url, port=port))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, name="registry-web-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
        yield Site(f"http://127.0.0.1:{port}", Registry(session_factory(engines[1])), sock_rx, boot_rx)
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=15)
        for engine in engines:
            engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium chromium-driver (scripts/bootstrap lists them)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    context = browser.new_context(base_url=site.url, viewport={"width": 1100, "height": 900})
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def _login(page: Page, email: str, password: str) -> None:
    page.goto("/ui/login")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def _wear_target(site: Site) -> float | None:
    return site.check.get_prescription(SYSTEM, site.sock_rx).wear_hours_per_day  # the first version


def _current_rx(site: Site) -> int:
    """Alice's newest sock prescription version (a change makes a new one)."""
    return max((rx.valid_from, rx.id) for rx in site.check.list_prescriptions(SYSTEM, ALICE)
               if rx.garment_kind == "sock")[1]  # fmt: skip


def _rx_audit(site: Site, patient: str, rx_id: int) -> list[s.AuditOut]:
    return site.check.audit(SYSTEM, entity="prescription", key=f"{patient}#{rx_id}")


def test_physio_changes_the_daily_wear_target(page: Page, site: Site) -> None:
    """The issue's acceptance check: log in, open a patient, change the daily wear target; registry and audit agree."""
    assert _wear_target(site) == 8
    _login(page, ANN, ANN_PASSWORD)
    expect(page).to_have_url(f"{site.url}/ui/patients")
    expect(page.get_by_role("heading", name="My patients")).to_be_visible()
    table = page.get_by_role("table")
    for mine in (ALICE, CARL, "Alice Example", "Carl Example"):
        expect(table).to_contain_text(mine)
    expect(table).not_to_contain_text(DORA)  # Bob's patient: not in Ann's default view
    expect(table).not_to_contain_text("Dora Example")
    expect(page.get_by_role("row", name=ALICE)).to_contain_text("RAL class 2 (23–32 mmHg), 8 h/day, 7 days/week")
    expect(page.get_by_role("row", name=ALICE)).to_contain_text("sock-0001 (sock)")

    page.get_by_role("link", name="Show all patients of the clinic").click()
    expect(page.get_by_role("table")).to_contain_text(DORA)
    page.get_by_role("link", name="Show my patients only").click()
    expect(page.get_by_role("table")).not_to_contain_text(DORA)

    page.get_by_role("link", name=ALICE).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(ALICE)
    garments = page.get_by_role("table").first
    expect(garments).to_contain_text("sock-0001")
    expect(garments).to_contain_text("gw-bowvalley-1")
    expect(garments).to_contain_text("1.4.2")
    form = page.locator(f"#rx-{site.sock_rx} form")
    target = form.get_by_label(WEAR_TARGET)
    expect(target).to_have_value("8")
    target.fill("10")
    form.get_by_role("button", name="Save changes").click()

    # A new version from today; the old one keeps 8 h for the days before (it ends yesterday: no form any more).
    (new_rx,) = [rx.id for rx in site.check.list_prescriptions(SYSTEM, ALICE) if rx.supersedes == site.sock_rx]
    expect(page.get_by_role("status")).to_contain_text(f"Prescription #{new_rx} saved: daily wear target 10")
    expect(page.get_by_role("status")).to_contain_text(f"#{site.sock_rx} stays as it was for the days before")
    expect(page).to_have_url(f"{site.url}/ui/patients/{ALICE}")  # redirected after the POST
    expect(page.locator(f"#rx-{new_rx} form").get_by_label(WEAR_TARGET)).to_have_value("10")
    expect(page.locator(f"#rx-{new_rx}")).to_contain_text(f"(replaced #{site.sock_rx})")
    expect(page.locator(f"#rx-{site.sock_rx}")).to_contain_text("8 h/day")
    expect(page.locator(f"#rx-{site.sock_rx}")).to_contain_text("ended")
    expect(page.locator("table.audit")).to_contain_text("8 → 10")
    expect(page.locator("table.audit")).to_contain_text(f"replacing #{site.sock_rx}")
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    for width in (1400, 390):  # the version history at a desktop's width and a phone's
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(SCREENSHOT.with_name(f"registry-patient-{width}.png")), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1, f"wider than {width} px"

    assert _wear_target(site) == 8  # the old version is never rewritten
    assert site.check.get_prescription(SYSTEM, new_rx).wear_hours_per_day == 10
    (entry,) = [e for e in _rx_audit(site, ALICE, new_rx) if e.action == "update"]
    assert entry.actor.startswith(ANN)
    assert entry.changes["before"] == {"wear_hours_per_day": 8}
    assert entry.changes["after"] == {"wear_hours_per_day": 10}
    assert entry.changes["supersedes"] == site.sock_rx


def test_wrong_password_shows_an_error(page: Page, site: Site) -> None:
    _login(page, ANN, "not-the-password")
    expect(page.get_by_role("alert")).to_have_text("Wrong e-mail or password.")
    expect(page.get_by_label("E-mail")).to_have_value(ANN)
    assert not [c for c in page.context.cookies() if c["name"] == "compression_session"]
    page.goto("/ui/patients")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_a_post_without_the_csrf_token_is_refused(page: Page, site: Site) -> None:
    before = _wear_target(site)
    _login(page, ANN, ANN_PASSWORD)
    cookie = next(c for c in page.context.cookies() if c["name"] == "compression_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/" and not cookie["secure"]
    page.goto(f"/ui/patients/{ALICE}")
    form = page.locator(f"#rx-{_current_rx(site)} form")
    form.locator("input[name=csrf]").evaluate("input => input.remove()")
    form.get_by_label(WEAR_TARGET).fill("12")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        form.get_by_role("button", name="Save changes").click()
    assert posted.value.status == 403
    expect(page.get_by_role("alert")).to_contain_text("CSRF")

    # A forged token (a form on another site cannot know the real one) is refused the same way.
    fields: dict[str, str | float | bool] = {"csrf": "0" * 64, "wear_hours_per_day": "12", "wear_days_per_week": "7",
              "out_of_range_tolerance_minutes": "30", "max_silence_hours": "24", "zones": "ankle"}  # fmt: skip
    response = page.request.post(f"/ui/prescriptions/{_current_rx(site)}", form=fields, max_redirects=0)
    assert response.status == 403
    assert _wear_target(site) == before


def test_an_impossible_target_shows_the_validation_message_and_changes_nothing(page: Page, site: Site) -> None:
    before, entries = _wear_target(site), len(_rx_audit(site, ALICE, _current_rx(site)))
    _login(page, ANN, ANN_PASSWORD)
    page.goto(f"/ui/patients/{ALICE}")
    form = page.locator(f"#rx-{_current_rx(site)} form")
    form.get_by_label(WEAR_TARGET).fill("30")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        form.get_by_role("button", name="Save changes").click()
    assert posted.value.status == 422
    expect(form.get_by_role("alert")).to_contain_text(f"{WEAR_TARGET}: Input should be less than or equal to 24")
    expect(form.get_by_label(WEAR_TARGET)).to_have_value("30")  # what was typed stays, to be corrected
    expect(form.get_by_label(WEAR_TARGET)).to_have_attribute("aria-invalid", "true")  # and the field is marked
    expect(form.get_by_label("Wear days per week")).not_to_have_attribute("aria-invalid", "true")
    assert _wear_target(site) == before
    assert len(_rx_audit(site, ALICE, _current_rx(site))) == entries


def test_a_contraindication_asks_for_an_override_reason(page: Page, site: Site) -> None:
    _login(page, ANN, ANN_PASSWORD)
    page.goto(f"/ui/patients/{CARL}")
    expect(page.get_by_role("table").nth(1)).to_contain_text("untreated dvt")
    form = page.locator(f"#rx-{site.boot_rx} form")
    expect(form.get_by_label("Override reason")).to_have_count(0)
    form.get_by_label("Sessions per week").fill("6")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        form.get_by_role("button", name="Save changes").click()
    assert posted.value.status == 409
    expect(form.get_by_role("alert")).to_contain_text("contraindicated")
    assert site.check.get_prescription(SYSTEM, site.boot_rx).sessions_per_week == 5

    form.get_by_label("Override reason").fill("vascular team cleared boot use on the right leg only")
    form.get_by_role("button", name="Save changes").click()
    expect(page.get_by_role("status")).to_contain_text("saved: sessions per week 6")
    (rx,) = [r for r in site.check.list_prescriptions(SYSTEM, CARL) if r.supersedes == site.boot_rx]
    assert (rx.sessions_per_week, rx.override_by) == (6, ANN)
    assert site.check.get_prescription(SYSTEM, site.boot_rx).sessions_per_week == 5  # the days before keep 5
    assert rx.override_reason == "vascular team cleared boot use on the right leg only"


def test_pages_need_a_login_and_sign_out_ends_the_session(page: Page, site: Site) -> None:
    page.goto("/ui/patients")
    expect(page).to_have_url(f"{site.url}/ui/login?next=%2Fui%2Fpatients")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto("/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.request.get("/ui/patients", max_redirects=0).status == 303

    page.goto(f"/ui/patients/{ALICE}")
    page.get_by_label("E-mail").fill(BOB)
    page.get_by_label("Password").fill(BOB_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{site.url}/ui/patients/{ALICE}")  # back where the login was asked for

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You are signed out.")
    page.goto("/ui/patients")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def _shots(page: Page, name: str) -> None:
    """Full-page screenshots at a desktop's and a phone's width (looked at while building the page)."""
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=f"/tmp/registry-{name}-{width}.png", full_page=True)
    page.set_viewport_size({"width": 1100, "height": 900})


def test_a_physio_changes_her_password_and_her_other_sessions_end(browser: Browser, site: Site) -> None:
    contexts = [browser.new_context(base_url=site.url, viewport={"width": 1100, "height": 900}) for _ in range(2)]
    try:
        here, elsewhere = (context.new_page() for context in contexts)
        for page in (here, elsewhere):
            _login(page, CLEO, CLEO_PASSWORD)
            expect(page.get_by_role("heading", name="My patients")).to_be_visible()
        here.get_by_role("link", name="Change password").click()
        expect(here.get_by_role("heading", name="Change your password")).to_be_visible()
        _shots(here, "password")
        new = "tidal-pine-2031-heron"

        def change(current: str, password: str, again: str) -> None:
            here.get_by_label("Current password", exact=True).fill(current)
            here.get_by_label("New password", exact=True).fill(password)
            here.get_by_label("Repeat the new password").fill(again)
            here.get_by_role("button", name="Change password").click()

        change(CLEO_PASSWORD, "cleocleocleocleo", "cleocleocleocleo")
        expect(here.get_by_role("alert")).to_contain_text("New password: do not use your e-mail address or name")
        change(CLEO_PASSWORD, "aaaaaaaaaaaaaa", "aaaaaaaaaaaaaa")
        expect(here.get_by_role("alert")).to_contain_text("New password: too easy to guess. Repeats like")
        _shots(here, "password-weak")
        change(CLEO_PASSWORD, new, new + "x")
        expect(here.get_by_role("alert")).to_contain_text("not the same as the new password")
        change("orchard-gate-2025", new, new)
        expect(here.get_by_role("alert")).to_contain_text("Current password: it is not the one you sign in with")
        assert "aaaaaaaaaaaaaa" not in here.content() and new not in here.content()
        change(CLEO_PASSWORD, new, new)
        expect(here.get_by_role("status")).to_contain_text("Your password is changed")
        elsewhere.goto("/ui/patients")  # the other browser's session has ended
        expect(elsewhere.get_by_role("heading", name="Sign in")).to_be_visible()
        here.goto("/ui/patients")  # this one goes on
        expect(here.get_by_role("heading", name="My patients")).to_be_visible()
        here.get_by_role("button", name="Sign out").click()
        _login(here, CLEO, new)
        expect(here.get_by_role("heading", name="My patients")).to_be_visible()
    finally:
        for context in contexts:
            context.close()
    entries = site.check.audit(SYSTEM, entity="login", key=CLEO)
    assert [e.action for e in entries] == ["login_failed"] and new not in str(entries)


def test_repeated_wrong_passwords_lock_the_sign_in_for_a_while(page: Page, site: Site) -> None:
    for attempt in range(5):
        _login(page, "locked@bowvalley.example", f"guess-{attempt}-of-many")
        expect(page.get_by_role("alert")).to_have_text("Wrong e-mail or password.")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        _login(page, "locked@bowvalley.example", "guess-5-of-many")
    assert posted.value.status == 429 and posted.value.headers["retry-after"] == "30"
    expect(page.get_by_role("alert")).to_have_text(
        "Too many wrong passwords for this e-mail or from this network; try again in 30 seconds.")
    _shots(page, "login-locked")
