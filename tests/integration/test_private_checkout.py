"""A checkout in a folder other users cannot enter (root's 0700 home) still starts every local server.

Started as root, Mosquitto drops to its ``mosquitto`` user and PostgreSQL runs
as ``postgres``: neither can enter ``/root/...``. The project's files are copied
into a 0700 folder and each server, then the demo (one day, no live phase), is
started from there by the copy's own code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from compression.localservers import LocalServer, ServerError, postgres_bin_dir

ROOT = Path(__file__).resolve().parents[2]

START_EACH = """
import os, sys, tempfile
from pathlib import Path
from compression import localservers as ls

root = Path("var/private").resolve()
before = set(os.listdir(tempfile.gettempdir()))
starts = [ls.start_mosquitto, ls.start_influxdb] + ([ls.start_postgres] if ls.postgres_bin_dir() else [])
for start in starts:
    server = start(root)
    entry = next(p for p in root.iterdir() if p.resolve() == server.folder)
    print(server.name, "link" if entry.is_symlink() else "folder", server.folder, flush=True)
    server.stop()
    server.start()  # restart in place: its persistence is readable by its own user
    server.close()
    assert not entry.exists() and not entry.is_symlink(), entry
after = set(os.listdir(tempfile.gettempdir()))
assert not {name for name in after - before if name.startswith("compression-")}, after - before
print("all servers started, restarted and removed")
"""


def _copy_checkout(target: Path) -> None:
    """The working tree's files (tracked and new, not ignored), as a clone of it would have them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def private_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o700)
    checkout = home / "compression"
    _copy_checkout(checkout)
    return checkout


def _run(checkout: Path, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # The copy's packages come first on sys.path (the current folder), not the installed ones.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.run([sys.executable, *argv], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def test_every_local_server_starts_from_a_0700_checkout(private_checkout: Path) -> None:
    assert (private_checkout.parent.stat().st_mode & 0o777) == 0o700
    done = _run(private_checkout, "-c", START_EACH, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all servers started, restarted and removed" in done.stdout
    lines = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.split()}
    if os.geteuid() == 0:
        # Root: the servers that run as another user had their folder made where that user can enter it.
        assert lines["mosquitto"][0] == "link", done.stdout
        assert lines["mosquitto"][1].startswith(tempfile.gettempdir()), done.stdout
        if postgres_bin_dir() is not None:
            assert lines["postgres"][0] == "link", done.stdout
    assert lines["influxdb"][0] == "folder", done.stdout  # runs as the invoking user: stays in var/


def test_the_demo_runs_one_day_from_a_0700_checkout(private_checkout: Path) -> None:
    done = _run(private_checkout, "-m", "compression", "demo", "--days", "1", "--live-minutes", "0", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all readings stored" in done.stdout, done.stdout[-3000:]
    assert "flags match the ground truth" in done.stdout, done.stdout[-3000:]


def test_a_server_that_cannot_start_names_its_folder_and_the_reason(tmp_path: Path) -> None:
    message = "1733300000: Error: Unable to open log file /nowhere/mosquitto.log for writing: Permission denied"
    server = LocalServer("mosquitto", tmp_path, 1, ["sh", "-c", f"echo 'starting'; echo '{message}'; exit 1"])
    with pytest.raises(ServerError) as raised:
        server.start()
    text = str(raised.value)
    assert "\n" not in text
    assert str(tmp_path) in text and "Permission denied" in text and "exited with 1" in text
