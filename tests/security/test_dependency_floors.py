"""Dependency floors past known CVEs: pyproject.toml names them, and what is installed satisfies them.

A floor lowered later (or a package dropped from pyproject.toml) fails here, as does an environment that installed
an older, vulnerable version.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

CVE_FLOORS = {
    "starlette": ("0.49.1", "CVE-2025-54121 (fixed in 0.47.2), CVE-2025-62727 (fixed in 0.49.1)"),
    "h11": ("0.16.0", "CVE-2025-43859"),
    "aiohttp": ("3.12.14", "CVE-2025-53643"),
    "cryptography": ("44.0.1", "CVE-2024-12797"),
    "setuptools": ("78.1.1", "CVE-2025-47273"),
}


def declared_floors() -> dict[str, list[Version]]:
    """Every ``>=`` floor pyproject.toml gives each package (dependencies, extras and build-system requires)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = [*data["build-system"]["requires"], *data["project"]["dependencies"]]
    for extra in data["project"]["optional-dependencies"].values():
        specs += extra
    floors: dict[str, list[Version]] = {}
    for text in specs:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                floors.setdefault(req.name.lower(), []).append(Version(spec.version))
    return floors


@pytest.mark.parametrize("package", sorted(CVE_FLOORS))
def test_every_declared_floor_is_past_the_cve(package: str) -> None:
    floor, cves = CVE_FLOORS[package]
    declared = declared_floors().get(package)
    assert declared, f"pyproject.toml names no floor for {package} ({cves})"
    low = [str(v) for v in declared if v < Version(floor)]
    assert not low, f"{package} floor(s) {low} in pyproject.toml are below {floor} ({cves})"


@pytest.mark.parametrize("package", sorted(CVE_FLOORS))
def test_installed_version_satisfies_the_declared_floor(package: str) -> None:
    installed = Version(metadata.version(package))
    for floor in declared_floors().get(package, []):
        assert installed >= floor, f"{package} {installed} is installed, pyproject.toml asks for >= {floor}"
    assert installed >= Version(CVE_FLOORS[package][0]), f"{package} {installed} has {CVE_FLOORS[package][1]}"
