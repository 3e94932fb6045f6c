"""
Model code that keeps KV caches consistent with the no-cache forward pass, written as it stands in transformers once
the pull-request series is merged.

Nothing here patches anything: `make diff` transplants these members into the series' pull requests
(`upstream_pr/series`). On the release the series is written for, the run-time patches (`patches/`) bind its longrope
`dynamic_rope_update` as they re-decorate each rotary `forward`.
"""
