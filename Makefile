# Everything a fresh machine needs: venv, pinned dependencies, data. Idempotent; fast the second time.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
export ADVTRANSFER_DATA ?= $(CURDIR)/.data
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test test-slow bench benchmark-embedded lint clean

install: $(STAMP)

# pyproject.toml declares compatible ranges; constraints.txt pins the exact tested set (pip -c)
PIP := $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -e '.[test]'
	$(PIP) --no-deps torchattacks
	touch $(STAMP)

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || echo "note: apt could not install dataset-fashion-mnist; advtransfer will try the internet"; \
	else echo "note: not root, skipping apt-get install dataset-fashion-mnist"; fi

data: $(STAMP) $(ADVTRANSFER_DATA)/.stamp-data

$(ADVTRANSFER_DATA)/.stamp-data: | $(FASHION)
	$(BIN)/advtransfer fetch-data
	touch $@

demo: install data
	$(BIN)/advtransfer demo --out runs/demo

test: install data
	$(BIN)/python -m pytest -o addopts="" -q -ra -m "not slow" tests

# The tests too long for every commit (standard AutoAttack of the shipped robust sources: several CPU minutes each)
test-slow: install data
	$(BIN)/python -m pytest -o addopts="" -q -ra -m slow tests

# docs/performance.md: every figure against a baseline measured in the same run (about 30 min on 2 cores; --quick: 8)
bench: install data
	$(BIN)/python benchmarks/bench.py --json docs/bench.json --log docs/bench.log

# The embedded benchmark (docs/results.md): the gate, then 156 grid + 36 natural-objective + 40 transfer runs, many
# hours on 2 cores (standard AutoAttack on 250 images dominates the robust source's seed-0 runs); finished runs are
# skipped, so it continues where it stopped. Set the grid's probe.lr from the gate's table before the grid runs.
EMBEDDED := runs/embedded
benchmark-embedded: install data
	for g in gate grid natural_ft transfer; do \
	  $(BIN)/advtransfer sweep configs/embedded/$$g.yaml --out $(EMBEDDED) --workers 2 || exit 1; done
	$(BIN)/python scripts/keep_runs.py $(EMBEDDED) docs/embedded
	$(BIN)/python scripts/results_md.py docs/embedded

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
