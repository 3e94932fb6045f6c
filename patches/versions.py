"""Which transformers releases the patches are written and tested for."""

from packaging.version import Version

import transformers


MINIMUM_VERSION = Version("5.23.0")
"""Oldest supported transformers release."""

UPPER_BOUND = Version("6.0.0")
"""First transformers release not supported (exclusive upper bound)."""

TESTED_VERSIONS = ("5.23.0",)
"""Releases the whole test suite runs against."""


def installed_version() -> Version:
    return Version(transformers.__version__)


def supported_range() -> str:
    return f">={MINIMUM_VERSION},<{UPPER_BOUND}"


def is_supported(version: Version) -> bool:
    return MINIMUM_VERSION <= Version(version.base_version) < UPPER_BOUND
