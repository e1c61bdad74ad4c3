# Two commands on a fresh machine: `make demo` (install + run the offline pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build, installed first: the tested release by default. Another build, e.g. CPU-only wheels:
#   make install TORCH_PINS="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Exact versions of every other package, as tested (Python 3.11, Linux x86_64); `make install LOCK=`
# resolves from pyproject.toml's ranges instead (other platforms, other Python versions).
LOCK ?= requirements.lock
CONSTRAINTS = $(if $(LOCK),-c $(LOCK))
# torch and what its build brings (CUDA runtime wheels, triton) are pinned by TORCH_PINS, not by the lock
UNLOCKED = ^(torch|torchvision|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+)==

.PHONY: install lock demo repro test test-fast lint ui benchmark clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(CONSTRAINTS) $(TORCH_PINS)
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Rewrite requirements.lock from the installed environment (after changing dependencies and testing).
lock: install
	{ echo "# Exact versions of the tested environment (Python 3.11, Linux x86_64), used as pip constraints"; \
	  echo "# by \`make install\`; torch/torchvision come from TORCH_PINS. Regenerate with \`make lock\`."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -E '$(UNLOCKED)'; } > requirements.lock

# Initialise git + DVC if this is not a repository yet (e.g. an unpacked archive).
repo:
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git -c user.name=medmerge -c user.email=medmerge@localhost commit -qm "initial")
	@test -d .dvc || $(BIN)/dvc init -q

# medmerge repro: dvc repro with independent stages side by side, one per core (JOBS=n to choose); the same
# outputs and dvc.lock as a plain `dvc repro`
demo: install repo
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/medmerge repro $(if $(JOBS),--jobs $(JOBS))
	$(BIN)/python scripts/readme_results.py
	@cat reports/comparison.md

repro:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/medmerge repro $(if $(JOBS),--jobs $(JOBS))

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not integration and not slow"

lint: install
	$(BIN)/ruff check .

# The MLflow UI on the same store the pipeline writes (127.0.0.1 only), after printing its links to the
# training runs and the latest evaluate run: MLflow 3.17's UI opens experiments on GenAI traces unless the
# URL asks for the model-training view. Stops with one line if the pipeline has not run yet.
UI_STORE = sqlite:///$(CURDIR)/mlflow.db
UI_ADDRESS = --host 127.0.0.1 --port 5000
ui: install
	@$(BIN)/medmerge ui-url --store $(UI_STORE) $(UI_ADDRESS)
	$(BIN)/mlflow ui --backend-store-uri $(UI_STORE) $(UI_ADDRESS)

benchmark: install
	$(BIN)/python -m benchmarks suite

clean:
	rm -rf data/raw data/processed models/sources models/pretrained models/ft models/lpft models/merge \
	  models/merged models/merged_ft reports/per_class.json reports/per_seed.csv reports/confusion reports/layerwise.csv
