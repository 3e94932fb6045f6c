"""
Which transformers releases the patches are written and tested for.

The supported range has one source: the transformers line of `requirements.txt` beside this module, which is also
what `pip install` of the project asks for (pyproject.toml reads that file). It runs from the oldest release of
`TESTED_VERSIONS` to the minor of the newest one, so a release nobody has tested is refused (see `patches.apply`).
"""

from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version


REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")

TESTED_VERSIONS = ("4.44.2", "4.46.3", "4.50.3", "4.57.6", "5.23.0", "5.24.0")
"""Releases the whole test suite runs against (`make test-matrix`), one per era of upstream's longrope code; the
newest is the one `make test` installs."""

NEWEST_TESTED_VERSION = TESTED_VERSIONS[-1]


@cache
def supported_specifier() -> SpecifierSet:
    """The transformers releases the patches support, as `requirements.txt` states them."""
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name == "transformers":
            return Requirement(line).specifier
    raise RuntimeError(f"{REQUIREMENTS_FILE} has no transformers requirement")


def installed_version() -> Version:
    import transformers

    return Version(transformers.__version__)


def supported_range() -> str:
    """The supported range as pip writes it, lower bound first: `>=4.44.2,<5.25`."""
    return ",".join(sorted((str(spec) for spec in supported_specifier()), key=lambda spec: not spec.startswith(">")))


def is_supported(version: Version) -> bool:
    # A development or release-candidate build counts as the release it leads to
    return Version(version.base_version) in supported_specifier()
