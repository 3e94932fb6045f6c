"""
The upstream pull requests, as a series (`series`): the code of `modeling_overrides/` placed in transformers' own
files by `ast`-located edits (`source_edits`), each pull request a `git apply`-able diff (`diff`) with its tests and its
description, verified at its place in the series (`series.verify`, with ruff from `checks`).
"""
