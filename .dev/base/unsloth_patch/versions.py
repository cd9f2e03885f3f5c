"""Installed versions from distribution metadata, without importing the packages."""

from __future__ import annotations

from importlib import metadata
from typing import Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


def installed(distribution: str) -> Optional[Version]:
    """The installed version of ``distribution``, or None if it is not installed."""
    try:
        return Version(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return None
    except InvalidVersion:
        return None


def release(distribution: str) -> Optional[Version]:
    """The installed version without pre/dev/local parts, for range checks (4.57.0.dev0 -> 4.57.0)."""
    version = installed(distribution)
    return None if version is None else Version(version.base_version)


def unmet(requirements: Mapping[str, str], versions: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why ``requirements`` ({distribution: specifier}) are not met, or None if they are.

    ``versions`` ({distribution: version}) replaces the installed versions (for the docs' matrix).
    """
    for distribution, specifier in requirements.items():
        if versions is not None:
            given = versions.get(distribution)
            version = Version(Version(given).base_version) if given else None
        else:
            version = release(distribution)
        if version is None:
            return f"{distribution} is not installed (needs {specifier})"
        if version not in SpecifierSet(specifier):
            return f"{distribution} {version} is outside the supported range {specifier}"
    return None


def at_least(distribution: str, minimum: str) -> bool:
    version = release(distribution)
    return version is not None and version >= Version(minimum)
