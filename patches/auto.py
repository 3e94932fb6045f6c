"""Applies the patches with their defaults on import: `import patches.auto`."""

from . import apply


apply()
