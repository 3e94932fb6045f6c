# Entry points. `make install` sets up .venv (once: again only when a requirement file or a version changes); every
# other target uses it. The project runs from this folder (PYTHONPATH), so nothing is built or installed from it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The newest release the patches are tested on, from the table of eras (patches/coverage.py imports only the
# standard library at the top, so this needs no environment)
TRANSFORMERS_VERSION ?= $(shell $(PYTHON) -c "import runpy; print(runpy.run_path('patches/coverage.py')['NEWEST_TESTED_VERSION'])")
INSTALLED := $(VENV)/.installed-torch-$(TORCH_VERSION)-transformers-$(TRANSFORMERS_VERSION)
export PYTHONPATH := $(CURDIR)

.PHONY: install demo check check-releases compare-strategies divergence diff bench profile test test-matrix test-slow style quality

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(INSTALLED): patches/requirements.txt requirements-dev.txt | $(PY)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet transformers==$(TRANSFORMERS_VERSION) -r patches/requirements.txt -r requirements-dev.txt
	touch $@

install: $(INSTALLED)

# The main job: every decoding path across the longrope switch, unpatched vs patched, on tiny models.
demo: install
	$(PY) scripts/reproduce.py

# What engines do at the switch (stale, recompute, rerotate, static factors), measured: table, CSVs and a PNG.
compare-strategies: install
	$(PY) -m pip install --quiet matplotlib
	$(PY) scripts/compare_strategies.py --output-dir out/strategies

# Cached vs no-cache decoding of the first generated token, per layer, per dtype and attention: table, CSV and PNG.
# Another model: make divergence DIVERGENCE_ARGS="--model /path/to/checkpoint --dtypes bf16 --attention sdpa"
DIVERGENCE_ARGS ?= --attention eager sdpa
divergence: install
	$(PY) -m pip install --quiet matplotlib
	$(PY) scripts/divergence_table.py $(DIVERGENCE_ARGS) --output-dir out/divergence

# The upstream pull requests, as a series: out/pr/NN-<slug>.diff and .md, made against the installed release (or
# TRANSFORMERS_SRC, a checkout of main), each verified at its place (its tests fail before it and pass with it).
diff: install
	$(PY) scripts/make_pr_diff.py --verify $(if $(TRANSFORMERS_SRC),--transformers-src $(TRANSFORMERS_SRC))

# What the patches cost, measured side by side in one process: a table, JSON and a PNG under out/bench/. CPU by
# default (a 34M-parameter Phi-3 switching at 512); on a GPU: make bench BENCH_ARGS="--device cuda"
BENCH_ARGS ?=
bench: install
	$(PY) -m pip install --quiet matplotlib
	$(PY) scripts/benchmark.py $(BENCH_ARGS) --output-dir out/bench

# What a decode step runs, normal and consistent mode: the operators it spends its time in (torch.profiler) and its
# operations at a 4k context, views aside, on the bench's model; a table and JSON under out/profile/. On a GPU:
# make profile PROFILE_ARGS="--device cuda"
PROFILE_ARGS ?=
profile: install
	$(PY) scripts/profile_decoding.py $(PROFILE_ARGS) --output-dir out/profile

# After upgrading transformers: every covered model and decoding path across the switch, patched, in seconds
check: install
	$(PY) -m patches check

# The suite on every core: one pytest-xdist worker per core, each on one thread (the tests that measure threads set
# them), a test class kept on one worker. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
PYTEST_WORKERS := -n $(TEST_WORKERS) --dist loadscope
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q $(PYTEST_WORKERS)

# The suite on every supported transformers era, each in its own environment under .matrix/ (torch shared).
# MATRIX_RELEASES="4.44.2 5.23.0" runs some of them only.
MATRIX_RELEASES ?=
test-matrix: install
	OMP_NUM_THREADS=1 $(PY) scripts/test_matrix.py --torch-version $(TORCH_VERSION) \
		$(if $(MATRIX_RELEASES),--releases $(MATRIX_RELEASES)) -- $(PYTEST_WORKERS)

# `python -m patches check` on every release the range admits (patches.coverage.SELF_CHECKED_RELEASES), each in an
# environment of its own under .matrix/ holding transformers alone (torch shared). CHECK_RELEASES="4.45.2" some only.
# CHECK_JOBS of them at once, one per core by default.
CHECK_RELEASES ?=
CHECK_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
check-releases: install
	$(PY) scripts/test_matrix.py --self-check --jobs $(CHECK_JOBS) --torch-version $(TORCH_VERSION) \
		$(if $(CHECK_RELEASES),--releases $(CHECK_RELEASES))

# Real sizes, GPUs and local checkpoints (tests marked @slow).
test-slow: install
	RUN_SLOW=1 $(PY) -m pytest tests -q

style: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
