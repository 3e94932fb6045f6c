"""
Upstream pull requests from `modeling_overrides/`: the same code the run-time patches bind, transplanted into
transformers' own files (`plan`, `source_edits`), as a `git apply`-able diff (`diff`) with its description
(`description`) and tests in upstream's layout (`pr_tests`).
"""
