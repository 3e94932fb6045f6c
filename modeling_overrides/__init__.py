"""
Model code that keeps KV caches consistent with the no-cache forward pass, written as it stands in transformers.

Nothing here patches anything: `patches` binds these functions onto the installed transformers, and `scripts/`
transplants them into an upstream pull request.
"""
