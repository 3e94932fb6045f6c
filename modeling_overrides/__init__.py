"""
Model code that keeps KV caches consistent with the no-cache forward pass, written as it stands in transformers once
the pull-request series is merged.

Nothing here patches anything: `make diff` transplants these members into the series' pull requests
(`upstream_pr/series`). The run-time patches (`patches/`) do not import it yet: binding it on the newest release is
open work (issue 22, item 6).
"""
