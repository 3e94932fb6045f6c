"""Which transformers releases the patches are written and tested for."""

from packaging.version import Version


MINIMUM_VERSION = Version("4.44.2")
"""Oldest supported transformers release."""

UPPER_BOUND = Version("6.0.0")
"""First transformers release not supported (exclusive upper bound)."""

TESTED_VERSIONS = ("4.44.2", "4.46.3", "4.50.3", "4.57.6", "5.23.0")
"""Releases the whole test suite runs against (`make test-matrix`), one per era of upstream's longrope code."""


def installed_version() -> Version:
    import transformers

    return Version(transformers.__version__)


def supported_range() -> str:
    return f">={MINIMUM_VERSION},<{UPPER_BOUND}"


def is_supported(version: Version) -> bool:
    return MINIMUM_VERSION <= Version(version.base_version) < UPPER_BOUND
