"""`make demo` runs `compression demo`: it must work end to end and say that everything was stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from compression.cli import cli

pytestmark = pytest.mark.integration


def test_demo_stores_every_reading(servers_root: Path) -> None:
    data_dir = servers_root / "demo"
    result = CliRunner().invoke(cli, ["demo", "--days", "2", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "all readings stored" in result.output
    assert "rolled_down" in result.output and "not_json" in result.output
    assert (data_dir / "ground-truth.json").stat().st_size > 1000
