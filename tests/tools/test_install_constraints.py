"""scripts/constraints.txt pins what scripts/setup.sh installs: it must stay a complete, consistent lock.

A pin that contradicts pyproject.toml makes setup fail to resolve; a dependency missing from the lock
floats to whatever its registry serves that day, which is what the lock exists to stop.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "scripts" / "constraints.txt"
EXTRAS = ("test", "demo-data")  # the extras setup.sh installs; "gpu" only NGC images carry


def read_pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        assert match, f"{path.name}:{number}: not a 'name==version' pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for e in EXTRAS for r in extras[e]]]


def setup_script_pins() -> dict[str, Version]:
    """The `name==version` arguments scripts/setup.sh passes to pip itself."""
    found = re.findall(r'"([A-Za-z0-9._-]+)==([0-9][^"\s]*)"', (REPO / "scripts" / "setup.sh").read_text())
    assert found, "scripts/setup.sh names no pinned package"
    return {canonicalize_name(name): Version(version) for name, version in found}


def test_the_lock_is_well_formed_and_satisfies_every_project_requirement() -> None:
    pins = read_pins(CONSTRAINTS)
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml requires {req}, which scripts/constraints.txt does not pin"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"scripts/constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}")
    for name, version in setup_script_pins().items():
        assert pins.get(name) == version, (
            f"scripts/setup.sh installs {name}=={version}, scripts/constraints.txt pins {pins.get(name)}")


def test_every_package_the_project_pulls_in_is_pinned() -> None:
    """Walk the installed project's requirements (its extras included) through their own: each one installed
    here must be in the lock, or a fresh setup would take whatever version its registry serves that day."""
    try:
        metadata.distribution("megatron-grm")
    except metadata.PackageNotFoundError:
        pytest.skip("megatron-grm is not installed in this environment (scripts/setup.sh installs it)")
    pins = read_pins(CONSTRAINTS)
    todo = [(req, set(req.extras)) for req in project_requirements()]
    seen: set[str] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} (needed for {req}) is installed but not pinned in scripts/constraints.txt"
        for child in metadata.requires(req.name) or []:
            child_req = Requirement(child)
            marker_env = [{"extra": e} for e in extras] or [{"extra": ""}]
            if child_req.marker is None or any(child_req.marker.evaluate(env) for env in marker_env):
                todo.append((child_req, set(child_req.extras)))
    assert {"torch", "megatron-core", "transformers", "numpy"} <= seen
