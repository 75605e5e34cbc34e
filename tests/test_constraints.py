"""constraints.txt, which the container image installs exactly, pins everything the gateway needs."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
STALE = "constraints.txt is stale: run scripts/lock (it resolves pyproject.toml's ranges afresh) and commit it"


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line.strip())
            assert match, f"constraints.txt: {line!r} is not an exact 'name==version' pin"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_constraints_pin_each_dependency_within_its_range() -> None:
    pins = _pins()
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    build = _pyproject()["build-system"]
    assert isinstance(build, dict)
    for text in [*project["dependencies"], *build["requires"]]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned; {STALE}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement.name}=={pins[name]} is outside {requirement.specifier}; {STALE}"
        )


def test_constraints_pin_every_package_the_dependencies_pull_in() -> None:
    """Walks the installed dependencies' own requirements (this environment's view of them)."""
    pins = _pins()
    wanted = [Requirement(text) for text in metadata.requires("api-token-gateway") or []]
    seen: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{requirement.name} (needed by the gateway's dependencies) is not pinned; {STALE}"
        wanted += [Requirement(text) for text in metadata.requires(requirement.name) or []]
