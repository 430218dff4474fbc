# Two commands do all the set-up: `make demo` and `make test`. Both install what is missing into
# .venv first (uv, with the overrides in constraints/overrides.txt and the machine's local wheel
# folder, where pip finds torch==2.13.0+cpu), then patch torchvision (scripts/fix_torchvision.py).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local wheel folder pip is configured with (it holds the +cpu torch wheel).
WHEELS := $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))
TINY := out/tiny-model
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint unit integration bench bench-gpu clean img2dataset

$(STAMP): pyproject.toml constraints/overrides.txt scripts/fix_torchvision.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	@# The installer's package list (200+ lines) goes to a file; the console gets its summary lines.
	$(BIN)/uv pip install --python $(BIN)/python $(foreach w,$(WHEELS),--find-links $(w)) \
	  --compile-bytecode --override constraints/overrides.txt -e '.[cpu,test]' > $(VENV)/install.log 2>&1 \
	  || { cat $(VENV)/install.log; exit 1; }
	@grep -E '^(Resolved|Prepared|Installed|Uninstalled|Audited) ' $(VENV)/install.log || true
	@echo "(the full package list: $(VENV)/install.log)"
	$(BIN)/python scripts/fix_torchvision.py
	touch $@

install: $(STAMP)

$(TINY)/config.json: $(STAMP) pipeline/testing/tiny_model.py
	$(BIN)/python -m pipeline tiny-model $(TINY)

samples/.done: $(STAMP) pipeline/testing/samples.py
	$(BIN)/python -m pipeline samples samples
	touch $@

demo: $(TINY)/config.json samples/.done
	$(BIN)/python -m pipeline run configs/demo.yaml

# img2dataset (a test dependency) pins webdataset<0.3 and pandas<3, so it lives in a venv of its own
# (.venv-img2dataset); the tests call its CLI. Idempotent: a no-op once installed.
img2dataset: $(STAMP)
	bash scripts/img2dataset_env.sh

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests scripts bench

# The quick tier (what CI runs): every unit test and one real-pipeline test per capability. Tests marked
# `slow` (more layouts, more failure paths, the console's signals) run with `make test-all`.
test: lint img2dataset
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: lint img2dataset
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP) img2dataset
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

# Benchmarks print figures as ratios against a baseline measured in the same run; JSON under out/bench/.
bench: $(STAMP)
	mkdir -p out/bench
	$(BIN)/python bench/bench_decode.py --json out/bench/decode.json
	$(BIN)/python bench/bench_plan.py --json out/bench/plan.json
	$(BIN)/python bench/bench_machinery.py --json out/bench/machinery.json
	$(BIN)/python bench/bench_dedup.py --json out/bench/dedup.json
	$(BIN)/python bench/bench_confidence.py
	$(BIN)/python bench/bench_export.py --json out/bench/export.json
	$(BIN)/python bench/bench_throughput.py --json out/bench/throughput.json

# On a GPU machine with vLLM installed (see README): JoyCaption's architecture on dummy weights.
bench-gpu:
	mkdir -p out/bench
	python3 bench/bench_throughput.py --gpu --json out/bench/throughput-gpu.json

clean:
	rm -rf out samples
