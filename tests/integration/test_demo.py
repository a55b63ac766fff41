"""`make demo` runs `compression demo`: it must work end to end and say that everything was stored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from compression.cli import cli

pytestmark = pytest.mark.integration


def test_demo_stores_every_reading(servers_root: Path) -> None:
    data_dir = servers_root / "demo"
    result = CliRunner().invoke(cli, ["demo", "--days", "2", "--live-minutes", "0.25", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "all readings stored" in result.output
    assert "rolled_down" in result.output and "not_json" in result.output
    # The registry knows the demo clinic, the broker admits only its accounts, every sample names its patient.
    assert "clinic 'demo-clinic'" in result.output and "13 patients" in result.output
    assert "(13 patients); 0 without a patient" in result.output
    assert (data_dir / "registry.db").exists()
    # The monitor's flags equal the ground truth on every complete patient-day; the e-mails were caught.
    match = re.search(r"flags match the ground truth on (\d+) of (\d+) patient-days", result.output)
    assert match is not None and match[1] == match[2] and int(match[2]) >= 13, result.output
    assert "[URGENT] Boot over-pressure" in result.output and "Daily digest" in result.output
    assert list(data_dir.glob("mail-*/*.eml"))
    # The live phase ran with the monitor's loop, and everything it sent was stored too.
    assert "live: the garments go on sending in real time" in result.output and "what to look at" in result.output
    assert (data_dir / "ground-truth.json").stat().st_size > 1000
