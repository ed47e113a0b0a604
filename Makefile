# `make demo`: set up and run the example job on tiny models (one machine, no servers).
# `make test`: set up and run lint, types and the whole test suite against real services.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOME_DIR := .ipbatch

PY312 := .venv-py312
PY312_STAMP := $(PY312)/.installed-stamp

REHEARSAL := .venv-gpu-rehearsal
REHEARSAL_STAMP := $(REHEARSAL)/.installed-stamp

.PHONY: install services demo test check lint typecheck unit bench clean test-py312 gpu-rehearsal py312-envs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Python 3.12 beside 3.11: the registry has only torch 2.13.0's CUDA build for it (a 527 MB
# wheel + 2.1 GB of NVIDIA runtime packages, which the CPU never uses but `import torch` needs)
$(PY312_STAMP): pyproject.toml
	rm -rf $(PY312)
	$$(scripts/find-python.sh 3.12) -m venv $(PY312)
	$(PY312)/bin/pip install --quiet --upgrade pip
	$(PY312)/bin/pip install --quiet torch==2.13.0
	$(PY312)/bin/pip install --quiet -e '.[dev]'
	touch $(PY312_STAMP)

services:
	bash scripts/services.sh

$(HOME_DIR)/models/TINY_MODELS.json: pipeline/tiny.py pipeline/tiny_faces.py | $(STAMP)
	$(BIN)/ipbatch models tiny $(HOME_DIR)/models

demo: install $(HOME_DIR)/models/TINY_MODELS.json
	IPBATCH_HOME=$(HOME_DIR) IPBATCH_MODELS=$(HOME_DIR)/models \
		$(BIN)/ipbatch run examples/catalog.jsonl
	IPBATCH_HOME=$(HOME_DIR) $(BIN)/ipbatch report -o $(HOME_DIR)/report.html

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layer contract in pyproject.toml

typecheck: install
	$(BIN)/mypy

# The inner loop for work in progress: lint, types and the unit tests but the `slow` ones (a
# compile, whole runs through the command); no services, no 3.12 leg, no rehearsal
check: install lint typecheck
	OMP_NUM_THREADS=1 $(BIN)/pytest tests/unit -m "not slow" -n 2 --dist worksteal -q --durations=10

test:
	@# the 3.12 venvs are minutes of downloading and unpacking: the 3.12 one is made in the
	@# background from the start, beside the 3.11 venv, lint and types (single-threaded work),
	@# the rehearsal's once the 3.11 venv it needs is there, beside the unit tests (their logs:
	@# .py312-envs.log, .rehearsal-env.log). The unit tests are mostly single-threaded
	@# (subprocesses, Python): two at a time, one per core, each with one torch thread (two
	@# threads each oversubscribe the cores: 6m45s instead of 5m04s); the integration tests run
	@# real workers and services, two tests at a time (each its own database, vhost, S3 server
	@# and Redis database), then the `disruptive` ones, which restart or rename what every test
	@# shares, alone, while the 3.12 leg runs beside them (SQLite only; they mostly wait)
	$(MAKE) --no-print-directory $(PY312_STAMP) > .py312-envs.log 2>&1 & py312=$$!; \
	$(MAKE) --no-print-directory install services lint typecheck || { wait $$py312; exit 1; }; \
	$(MAKE) --no-print-directory $(REHEARSAL_STAMP) > .rehearsal-env.log 2>&1 & rehearsal=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/pytest tests/unit -n 2 --dist worksteal --durations=15; unit=$$?; \
	OMP_NUM_THREADS=1 $(BIN)/pytest tests/integration -m "not disruptive" -n 2 --dist worksteal \
		--durations=15; together=$$?; \
	if ! wait $$py312; then cat .py312-envs.log; echo "making the 3.12 venv failed"; exit 1; fi; \
	OMP_NUM_THREADS=1 $(PY312)/bin/pytest $(PY312_TESTS) -n 2 --dist worksteal -p no:cacheprovider \
		--durations=10 > .py312-tests.log 2>&1 & leg=$$!; \
	$(BIN)/pytest tests/integration -m disruptive --durations=5; alone=$$?; \
	wait $$leg; leg312=$$?; cat .py312-tests.log; \
	if ! wait $$rehearsal; then cat .rehearsal-env.log; echo "making the rehearsal venv failed"; exit 1; fi; \
	exit $$((unit || together || alone || leg312))
	$(MAKE) gpu-rehearsal

py312-envs: $(PY312_STAMP) $(REHEARSAL_STAMP)

# Python 3.12: what an interpreter can change, in a venv of its own: the one-machine end to end,
# the CLI and the train command as subprocesses (trained, used by name; killed and resumed),
# manifest parsing, images, imports and Celery's configuration. The rest is the same torch
# computing the same numbers under any interpreter (every unit test passed on 3.12 when run in
# full, 2026-12-03); it runs on 3.11 above.
PY312_TESTS := tests/unit/test_run_local.py tests/unit/test_cli.py \
	tests/unit/test_train_run.py::test_train_then_generate_with_the_adapter_by_name \
	tests/unit/test_train_run.py::test_a_killed_run_resumes_to_the_same_adapter \
	tests/unit/test_verify.py tests/unit/test_manifest.py tests/unit/test_hostile_input.py \
	tests/unit/test_images.py tests/unit/test_imports.py tests/unit/test_celery_config.py
test-py312: $(PY312_STAMP) services
	OMP_NUM_THREADS=1 $(PY312)/bin/pytest $(PY312_TESTS) -n 2 --dist worksteal -p no:cacheprovider \
		--durations=10

# The GPU command rehearsed on the CPU before a GPU is ever used: a clean Python 3.12 venv with
# only the GPU image's packages that ipbatch uses (at the image's versions) plus torch, the
# wheels bench/gpu-wheels.sh fetches for the rest, and `DRY_RUN=1 bench/gpu.sh` on tiny models
# Its venv is made anew whenever what decides its packages changes
$(REHEARSAL_STAMP): pyproject.toml bench/gpu_wheels.py bench/gpu-image-packages.txt | $(STAMP)
	rm -rf $(REHEARSAL)
	$$(scripts/find-python.sh 3.12) -m venv $(REHEARSAL)
	$(REHEARSAL)/bin/pip install --quiet --upgrade pip
	PY=$(BIN)/python bench/gpu-wheels.sh --image-requirements $(REHEARSAL)/image-packages.txt
	$(REHEARSAL)/bin/pip install --quiet torch==2.13.0 -r $(REHEARSAL)/image-packages.txt
	touch $@

gpu-rehearsal: $(REHEARSAL_STAMP)
	rm -rf .gpu-rehearsal
	DRY_RUN=1 BUDGET=420 PY=$(REHEARSAL)/bin/python bench/gpu.sh .gpu-rehearsal
	$(BIN)/python -c "import json, sys; f = json.load(open('.gpu-rehearsal/figures.json')); \
		sys.exit('rehearsal incomplete: ' + repr(f['stopped']) if f['stopped'] else 0)"

bench: install
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) $(PY312) $(REHEARSAL) .gpu-rehearsal .whl .py312-envs.log .rehearsal-env.log \
		.py312-tests.log $(HOME_DIR) .pytest_cache \
		.mypy_cache .ruff_cache
