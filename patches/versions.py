"""
Which transformers releases the patches support: the version gate.

The releases are those of `patches.coverage.ERAS`: the range runs from the oldest tested release to the minor of the
newest one (`coverage.supported_requirement()`), so a release nobody has tested is refused (see `patches.apply`).
`requirements.txt` beside this module states the same range for `pip install` (pyproject.toml reads that file); a test
keeps the two equal.
"""

from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .coverage import NEWEST_TESTED_VERSION, TESTED_VERSIONS, supported_requirement


__all__ = [
    "NEWEST_TESTED_VERSION",
    "REQUIREMENTS_FILE",
    "TESTED_VERSIONS",
    "installed_version",
    "is_supported",
    "supported_range",
    "supported_specifier",
]

REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")


@cache
def supported_specifier() -> SpecifierSet:
    """The transformers releases the patches support."""
    return Requirement(supported_requirement()).specifier


def installed_version() -> Version:
    import transformers

    return Version(transformers.__version__)


def supported_range() -> str:
    """The supported range as pip writes it, lower bound first: `>=4.44.2,<5.25`."""
    return ",".join(sorted((str(spec) for spec in supported_specifier()), key=lambda spec: not spec.startswith(">")))


def is_supported(version: Version) -> bool:
    # A development or release-candidate build counts as the release it leads to
    return Version(version.base_version) in supported_specifier()
