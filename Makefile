# Two commands on a fresh machine: `make demo` (install + run the offline pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision releases this platform serves from local disk (see ../shared/PLATFORM.md)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo repro test test-fast lint ui benchmark clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Initialise git + DVC if this is not a repository yet (e.g. an unpacked archive).
repo:
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git -c user.name=medmerge -c user.email=medmerge@localhost commit -qm "initial")
	@test -d .dvc || $(BIN)/dvc init -q

demo: install repo
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python scripts/readme_results.py
	@cat reports/comparison.md

repro:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check .

# The MLflow UI on the same store the pipeline writes (127.0.0.1 only).
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

benchmark: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf data/raw data/processed models/sources models/pretrained models/ft models/lpft models/merge \
	  models/merged models/merged_ft reports/per_class.json reports/per_seed.csv reports/confusion reports/layerwise.csv
