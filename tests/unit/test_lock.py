"""The dependency locks (requirements/*.lock, made by scripts/lock) are in step with pyproject.toml and installed.

scripts/bootstrap (make test, CI) installs requirements/test.lock and the Dockerfile requirements/runtime.lock,
both with ``pip --require-hashes``: these tests fail when a dependency changes in pyproject.toml without the locks
being made again, when a locked version lacks its hashes, when the image would get another version than the tests
ran with, or when this environment holds other versions than the lock says.
"""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
# "name==version ; marker \" (the marker only in a universal lock's platform-specific entries)
_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)"
                    r"(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked(name: str) -> dict[str, list[tuple[str, Marker | None, int]]]:
    """Per canonical package name: (version, marker, number of hashes) of each entry of ``requirements/<name>``."""
    entries: dict[str, list[tuple[str, Marker | None, int]]] = defaultdict(list)
    current: tuple[str, str, Marker | None] | None = None
    hashes = 0
    for line in (LOCKS / name).read_text().splitlines():
        match = _ENTRY.match(line)
        if match:
            if current:
                entries[current[0]].append((current[1], current[2], hashes))
            marker = Marker(match["marker"]) if match["marker"] else None
            current, hashes = (canonicalize_name(match["name"]), match["version"], marker), 0
        elif line.strip().startswith("--hash=sha256:"):
            hashes += 1
    if current:
        entries[current[0]].append((current[1], current[2], hashes))
    return entries


def declared(extras: bool) -> list[Requirement]:
    """pyproject.toml's dependencies (and its test tools with ``extras``) and what building the package needs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    if extras:
        names += project["project"]["optional-dependencies"]["test"]
    return [Requirement(name) for name in names]


@pytest.mark.parametrize(("lock", "extras"), [("test.lock", True), ("runtime.lock", False)])
def test_every_declared_dependency_is_locked_at_a_version_it_allows(lock: str, extras: bool) -> None:
    entries = locked(lock)
    for requirement in declared(extras):
        versions = [version for version, _marker, _hashes in entries.get(canonicalize_name(requirement.name), [])]
        assert versions, f"{requirement.name} is in pyproject.toml but not in requirements/{lock}: run scripts/lock"
        allowed = [v for v in versions if requirement.specifier.contains(v, prereleases=True)]
        assert allowed, f"requirements/{lock} has {requirement.name} {versions}, pyproject.toml asks {requirement}"


@pytest.mark.parametrize("lock", ["test.lock", "runtime.lock"])
def test_every_locked_version_carries_its_hashes(lock: str) -> None:
    entries = locked(lock)
    assert len(entries) > 20
    missing = [name for name, found in entries.items() for _v, _m, hashes in found if hashes == 0]
    assert not missing, f"no --hash for {missing} in requirements/{lock}"


def test_the_image_gets_the_versions_the_tests_ran_with() -> None:
    tested = locked("test.lock")
    for name, found in locked("runtime.lock").items():
        assert {v for v, _m, _h in found} <= {v for v, _m, _h in tested[name]}, name


def test_this_environment_holds_exactly_the_locked_versions() -> None:
    wrong = []
    for name, found in locked("test.lock").items():
        for version, marker, _hashes in found:
            if marker is not None and not marker.evaluate():
                continue
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = "not installed"
            if installed != version:
                wrong.append(f"{name}: locked {version}, installed {installed}")
    assert not wrong, "run scripts/bootstrap (it installs requirements/test.lock): " + "; ".join(wrong)
