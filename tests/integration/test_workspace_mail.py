"""E-mails that carry their evidence, asserted against the simulators' ground truth; actions in later e-mails and
the digest; every e-mail readable at a phone's width (real Chromium).

The simulated clinic (``tests/integration/clinic.py``) went through the real broker, ingester and InfluxDB; the
monitor's first round e-mailed each open episode to a real SMTP server. Each e-mail's "What the readings show"
states the values the ground truth computes from the very readings the simulators sent: the ankle median and
its highest or lowest, minutes out of the band, calf against ankle while reversed, the 7-day median, wear hours,
a boot session's chamber, peak and length, sessions in the week.
"""

from __future__ import annotations

import asyncio
import re
import statistics
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.integration.clinic import PHYSIO1, PHYSIO2, Clinic, signed_in
from tests.integration.test_workspace_charts import slices
from tests.integration.test_workspace_web import CHROMIUM, LAUNCH_ARGS, SHOTS
from tests.smtp import ReceivedMail

pytestmark = pytest.mark.integration

PHONE = 390


def in_thread(work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on an event loop of its own (so it works beside Playwright's sync API too)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work()).result()


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def readings(text: str) -> str:
    """The e-mail's "What the readings show" paragraph (unwrapped)."""
    found = re.search(r"What the readings show:\n(.*?)\n(?:- |\n)", text, re.S)
    assert found is not None, text
    return " ".join(found.group(1).split())


def opened(clinic: Clinic) -> dict[tuple[str, str], ReceivedMail]:
    """The opening e-mails by (patient, flag title)."""
    out = {}
    for mail in clinic.smtp.received():
        msg = mail.message
        if str(msg["X-Compression-Dedupe-Key"]).startswith("opened:"):
            title, _, rest = str(msg["Subject"]).split("] ", 1)[1].partition(": ")
            out[(rest.split(" (")[0], title)] = mail
    return out


def truth_day(patient: dict[str, Any], label: str) -> dict[str, Any]:
    """The ground truth's day that an e-mail names as ``Thu 03 Dec``."""
    return next(d for d in patient["days"] if date.fromisoformat(d["date"]).strftime("%a %d %b") == label)


def patient_of(clinic: Clinic, scenario: str) -> dict[str, Any]:
    return next(p for p in clinic.truth["patients"] if p["scenario"] == scenario)


def named_day(headline: str) -> str:
    found = re.search(r"(?:On|to|started) ((?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) \d\d \w\w\w)", headline)
    assert found is not None, headline
    return found.group(1)


def f1(value: float) -> str:
    return f"{value:.1f}"


def check_pressure(clinic: Clinic, scenario: str, flag: str, text: str) -> None:
    patient = patient_of(clinic, scenario)
    headline = readings(text)
    day = truth_day(patient, named_day(headline))
    ankles = slices(clinic, patient["patient"])[day["date"]].worn_ankles()
    side, seconds, extreme = (("above", day["above_range_s"], max(ankles)) if flag == "too_tight"
                              else ("below", day["below_range_s"], min(ankles)))  # fmt: skip
    assert f"ankle median {f1(day['ankle_median_mmhg'])} mmHg (range {f1(min(ankles))}-{f1(max(ankles))})" in headline
    assert f"{seconds / 60:.0f} min of wear {side} the band" in headline
    assert f"{f1(extreme)} mmHg." in headline, (headline, extreme)
    low, high = patient["prescription"]["range_mmhg"]
    assert f"prescribed {low:g}-{high:g} mmHg" in headline


def check_rolled_down(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "rolled_down")
    headline = readings(text)
    day = truth_day(patient, named_day(headline))
    worn = slices(clinic, patient["patient"])[day["date"]]
    reversed_ = [s for s in worn.samples if s.worn and s.pressure_mmhg["calf"] - s.pressure_mmhg["ankle"] > 3.0]
    calf = statistics.fmean(s.pressure_mmhg["calf"] for s in reversed_)
    ankle = statistics.fmean(s.pressure_mmhg["ankle"] for s in reversed_)
    assert f"for {day['reversed_gradient_s'] / 60:.0f} min of {day['wear_s'] / 3600:.1f} h worn" in headline
    assert f"calf {f1(calf)} mmHg vs ankle {f1(ankle)} mmHg (calf - ankle {calf - ankle:+.1f} mmHg)" in headline


def check_worn_out(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "worn_out")
    headline = readings(text)
    complete = [d for d in patient["days"] if d["complete"]]
    # The e-mail's week ends with the last day it shows (today, so far, while the episode is open).
    today = patient["days"][-1]
    week = [a for d in patient["days"][-7:] for a in slices(clinic, patient["patient"])[d["date"]].worn_ankles()]
    assert f"to {date.fromisoformat(today['date']).strftime('%a %d %b')}: {f1(statistics.median(week))} mmHg" \
        in headline, (headline, complete[-1])
    assert f"below the band's {patient['prescription']['range_mmhg'][0]:g} mmHg" in headline


def check_under_use(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "under_use")
    headline = readings(text)
    day = next(d for d in reversed(patient["days"]) if d["complete"])
    assert f"; {day['wear_s'] / 3600:.1f} h on {date.fromisoformat(day['date']).strftime('%a %d %b')}." in headline
    assert f"against {patient['prescription']['wear_hours_per_day']:g} h prescribed" in headline


def check_overpressure(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "boot_overpressure")
    headline = readings(text)
    day = truth_day(patient, named_day(headline))
    peak = re.search(r"the (\w+) chamber reached ([\d.]+) mmHg", headline)
    assert peak is not None and peak.group(2) == f1(day["peak_mmhg"]), (headline, day["peak_mmhg"])
    lengths = {f"{s['duration_s'] / 60:.0f} min" for s in day["sessions"]}
    assert re.search(r"\((\d+ min)\)", headline).group(1) in lengths  # type: ignore[union-attr]
    assert f"above the prescribed maximum {patient['prescription']['max_mmhg']:g} mmHg" in headline
    assert "Suggested next step: Call the client today" in " ".join(text.split())


def check_short(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "boot_short_sessions")
    headline = readings(text)
    day = truth_day(patient, named_day(headline))
    short = [s for s in day["sessions"] if s["duration_s"] < patient["prescription"]["session_min_s"]]
    assert f"lasted {short[-1]['duration_s'] / 60:.0f} min" in headline, (headline, day["sessions"])


def check_missed(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "boot_missed_sessions")
    headline = readings(text)
    day = truth_day(patient, named_day(headline))
    assert headline.startswith(f"{day['sessions_in_window']} session(s) in the ")
    assert f"{day['sessions_required_in_window']} required" in headline


def check_silent(clinic: Clinic, text: str) -> None:
    patient = patient_of(clinic, "silent")
    headline = readings(text)
    found = re.search(r"since (\w\w\w \d\d \w\w\w \d\d:\d\d)", headline)
    assert found is not None, headline
    last = datetime.fromtimestamp(patient["transport"]["last_sample_ms"] / 1000, ZoneInfo(clinic.truth["timezone"]))
    # The newest stored point: the last sample, or a status the dying garment sent soon after it.
    shown = datetime.strptime(f"{last.year} {found.group(1)}", "%Y %a %d %b %H:%M").replace(tzinfo=last.tzinfo)
    assert 0 <= (shown - last.replace(second=0, microsecond=0)).total_seconds() <= 3600, (shown, last)


CHECKS: dict[tuple[str, str], Callable[[Clinic, str], None]] = {
    ("too_tight", "Too tight"): lambda c, t: check_pressure(c, "too_tight", "too_tight", t),
    ("rolled_down", "Too loose"): lambda c, t: check_pressure(c, "rolled_down", "too_loose", t),
    ("rolled_down", "Rolled down"): check_rolled_down,
    ("worn_out", "Worn out"): check_worn_out,
    ("under_use", "Under-use"): check_under_use,
    ("silent", "No data from the garment"): check_silent,
    ("boot_overpressure", "Boot over-pressure"): check_overpressure,
    ("boot_short_sessions", "Short boot sessions"): check_short,
    ("boot_missed_sessions", "Missed boot sessions"): check_missed,
}


def test_every_flags_e_mail_states_its_evidence_from_the_stored_readings(clinic: Clinic) -> None:
    mails = opened(clinic)
    checked = []
    for (scenario, title), check in CHECKS.items():
        code = clinic.by_scenario[scenario]
        mail = mails.get((code, title))
        assert mail is not None, f"no opening e-mail for {scenario} {title}: {sorted(mails)}"
        text = text_of(mail.message)
        check(clinic, text)
        assert f"/ui/workspace/patients/{code}#episode-" in text  # the deep link to the patient's page
        checked.append(title)
    assert len(checked) == len(CHECKS)


def test_actions_reach_later_e_mails_and_the_digest(clinic: Clinic) -> None:
    code = clinic.by_scenario["under_use"]
    client = signed_in(clinic.url, PHYSIO2)  # under_use's physio
    try:
        page = client.get(f"/ui/workspace/patients/{code}").text
        episode = int(re.search(r'id="episode-(\d+)"', page).group(1))  # type: ignore[union-attr]
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        note = "Phoned: putting the stocking on is hard; donning aid ordered."
        for form in ({"kind": "acknowledge", "note": note}, {"kind": "handover", "to": PHYSIO1,
                                                              "note": "I am away next week, please follow up"}):
            answer = client.post(f"/ui/workspace/episodes/{episode}/actions", data={"csrf": csrf, **form})
            assert answer.status_code == 303, answer.text[:300]
    finally:
        client.close()
    before = len(clinic.smtp.received())
    in_thread(clinic.monitor.send_due)
    handover = [m for m in clinic.smtp.received()[before:] if "handover:" in str(m.message["X-Compression-Dedupe-Key"])]
    assert len(handover) == 1 and handover[0].rcpt_tos == (PHYSIO1,)
    text = " ".join(text_of(handover[0].message).split())
    assert str(handover[0].message["Subject"]).startswith(f"[Warning] Under-use: {code}")
    assert "Handed over to you by Demo Physio 2: I am away next week, please follow up" in text
    assert f"acknowledged by Demo Physio 2: {note}" in text and "What the readings show:" in text

    in_thread(clinic.monitor.digest_if_due)
    in_thread(clinic.monitor.send_due)
    digests = {m.rcpt_tos[0]: m for m in clinic.smtp.received() if str(m.message["X-Compression-Dedupe-Key"])
               .startswith("digest:")}  # fmt: skip
    assert set(digests) == {PHYSIO1, PHYSIO2}
    mine = " ".join(text_of(digests[PHYSIO2].message).split())
    assert "done: Under-use: handed over to Demo Physio 1 by Demo Physio 2" in mine
    theirs = " ".join(text_of(digests[PHYSIO1].message).split())
    assert f"{code} " in theirs and "handed over to you by Demo Physio 2: I am away next week" in theirs


def test_the_digest_counts_what_its_legend_says(clinic: Clinic) -> None:
    if not any(str(m.message["X-Compression-Dedupe-Key"]).startswith("digest:") for m in clinic.smtp.received()):
        in_thread(clinic.monitor.digest_if_due)
        in_thread(clinic.monitor.send_due)
    counted = 0
    for mail in clinic.smtp.received():
        if not str(mail.message["X-Compression-Dedupe-Key"]).startswith("digest:"):
            continue
        text = text_of(mail.message)
        assert "Without a flag: how many carried no flag at all" in " ".join(text.split())
        for line in text.splitlines():
            found = re.match(r"(PT-\w+) .* wear target met (\d+)/(\d+) days +without a flag (\d+)/(\d+) days", line)
            if found is None:
                continue
            patient = next(p for p in clinic.truth["patients"] if p["patient"] == found.group(1))
            week = [d for d in patient["days"] if d["complete"]][-7:]
            assert int(found.group(4)) == sum(1 for d in week if d["flags"] == ["compliant"]), line
            if patient["kind"] == "sock":
                target = patient["prescription"]["wear_hours_per_day"] * 3600
                assert int(found.group(2)) == sum(1 for d in week if d["wear_s"] >= target), line
            counted += 1
    assert counted == len(clinic.truth["patients"])  # every patient, in one digest or the other


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def as_page(message: EmailMessage) -> str:
    """The HTML part with its inline images as data URIs (what a mail client shows)."""
    import base64

    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None
    html = str(html_part.get_content())
    for part in message.walk():
        cid = part.get("Content-ID")
        if cid and part.get_content_type() == "image/png":
            data = base64.b64encode(part.get_payload(decode=True)).decode()  # type: ignore[arg-type]
            html = html.replace(f"cid:{cid.strip('<>')}", f"data:image/png;base64,{data}")
    return html


def test_every_e_mail_reads_at_a_phones_width(browser: Browser, clinic: Clinic) -> None:
    in_thread(clinic.monitor.digest_if_due)
    in_thread(clinic.monitor.send_due)
    context = browser.new_context(viewport={"width": PHONE, "height": 800}, device_scale_factor=1)
    SHOTS.mkdir(exist_ok=True)
    try:
        page = context.new_page()
        for mail in clinic.smtp.received():
            page.set_content(as_page(mail.message))
            page.wait_for_load_state()
            width = int(page.evaluate("document.documentElement.scrollWidth"))
            assert width <= PHONE, f"{mail.message['Subject']}: {width} px wide at {PHONE} px"
            smallest = page.evaluate("Math.min(...[...document.querySelectorAll('p, li')].map("
                                     "e => parseFloat(getComputedStyle(e).fontSize)))")  # fmt: skip
            assert smallest >= 12, f"{mail.message['Subject']}: text of {smallest} px"
            key = str(mail.message["X-Compression-Dedupe-Key"]).replace(":", "-").replace("@", "-")
            if key.startswith(("digest", "handover")) or "URGENT" in str(mail.message["Subject"]):
                page.screenshot(path=str(SHOTS / f"mail-{key}-{PHONE}.png"), full_page=True)
    finally:
        context.close()
    assert datetime.now(UTC)  # the e-mails were all looked at
    assert Path(SHOTS).exists()
