#!/usr/bin/env python3
"""The README's pictures, from a demo run: Today, a patient's page and an alert e-mail, in headless Chromium.

Runs ``compression demo --keep`` on a free port (its own servers under ``var/screenshots``), signs in as the
physio it prints, and writes to ``docs/screenshots/``:

- ``today.png`` (1400 px wide) and ``today-phone.png`` (390 px): the whole clinic on Today;
- ``patient.png``: the page of the stocking whose top rolled down (open episodes with their evidence and actions,
  the charts);
- ``alert-email.png``: the newest urgent e-mail as a phone (390 px) shows it, its chart inline.

Then stops the demo (Ctrl-C, as a person would). ``make screenshots`` runs it.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.localservers import free_port  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
READY = re.compile(r"workspace: (http://\S+)\s+sign in as (\S+) / (\S+)")
MAILS = re.compile(r"e-mails \(\.eml, open in any mail client\):\s+(\S+)")
STARTUP_S = 900


def start_demo(port: int) -> tuple[subprocess.Popen[str], str, str, str, Path]:
    """The demo with --keep, read until it prints the workspace's address and sign-in."""
    command = [str(ROOT / ".venv" / "bin" / "compression"), "demo", "--keep", "--days", "14", "--live-minutes",
               "0.5", "--port", str(port), "--data-dir", "var/screenshots"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "NO_COLOR": "1"})  # fmt: skip
    assert proc.stdout is not None
    mails: Path | None = None
    deadline = time.monotonic() + STARTUP_S
    for line in proc.stdout:
        print(line, end="")
        if (found := MAILS.search(line)) is not None:
            mails = ROOT / found.group(1)
        if (ready := READY.search(line)) is not None and mails is not None:
            return proc, ready.group(1), ready.group(2), ready.group(3), mails
        if time.monotonic() > deadline:
            break
    stop(proc)
    raise SystemExit("the demo did not get to the workspace")


def stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a person stops the demo; killed if it does not stop."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def sign_in(page: Page, url: str, email: str, password: str) -> None:
    page.goto(f"{url}login")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/workspace/")


def urgent_mail(folder: Path) -> EmailMessage:
    """The newest urgent e-mail the demo's catcher kept."""
    for path in sorted(folder.glob("*.eml"), reverse=True):
        parsed = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        assert isinstance(parsed, EmailMessage)
        if str(parsed["Subject"]).startswith("[URGENT]"):
            return parsed
    raise SystemExit(f"no urgent e-mail in {folder}")


def as_page(message: EmailMessage) -> str:
    """The HTML part with its inline images as data URIs (what a mail client shows)."""
    body = message.get_body(preferencelist=("html",))
    assert body is not None
    html = str(body.get_content())
    for part in message.walk():
        cid = part.get("Content-ID")
        if cid and part.get_content_type() == "image/png":
            data = base64.b64encode(part.get_payload(decode=True)).decode()  # type: ignore[arg-type]
            html = html.replace(f"cid:{cid.strip('<>')}", f"data:image/png;base64,{data}")
    return html


def shoot(url: str, email: str, password: str, mails: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        desk = browser.new_page(viewport={"width": 1400, "height": 1000})
        sign_in(desk, url, email, password)
        desk.goto(f"{url}workspace/?scope=all")
        desk.screenshot(path=str(OUT / "today.png"), full_page=True)
        phone = browser.new_page(viewport={"width": 390, "height": 1400})
        sign_in(phone, url, email, password)
        phone.goto(f"{url}workspace/?scope=all")
        phone.screenshot(path=str(OUT / "today-phone.png"))
        desk.locator("tr", has_text="Rolled down").get_by_role("link").first.click()
        desk.set_viewport_size({"width": 1400, "height": 2300})
        desk.screenshot(path=str(OUT / "patient.png"))
        mail = browser.new_page(viewport={"width": 390, "height": 800})
        mail.set_content(as_page(urgent_mail(mails)))
        mail.screenshot(path=str(OUT / "alert-email.png"), full_page=True)
        browser.close()
    print(f"wrote {', '.join(p.name for p in sorted(OUT.glob('*.png')))} to {OUT}")


def main() -> None:
    proc, url, email, password, mails = start_demo(free_port())
    try:
        shoot(url, email, password, mails)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
