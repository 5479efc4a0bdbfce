# fmr1: every target sets up .venv itself when it is missing.
#   make reproduce            run every notebook of the tiny profile headless (papermill)
#   make reproduce PROFILE=qwen2_5_vl_3b
#   make test                 unit tests + notebooks under nbval (every tier)
#   make test-unit | test-train | test-notebooks   one tier (tests/README.md)
#   make lint | figures | bench | clean-venv
# GPU users: make reproduce TORCH_SPEC='torch==2.8.0' (or any CUDA build pip can find).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= tiny
STAMP := $(VENV)/.fmr1-installed

.PHONY: venv reproduce figures test test-unit test-train test-notebooks lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch may resolve to a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The notebooks' kernel lives inside the venv, not in the home folder.
	$(BIN)/python -m ipykernel install --sys-prefix --name fmr1 --display-name "Python (fmr1)" >/dev/null
	# Strip notebook outputs on commit (git filter from .gitattributes); harmless outside git.
	-git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install
	touch $(STAMP)

venv: $(STAMP)

reproduce: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m fmr1lib reproduce --profile $(PROFILE)

figures: reproduce

test: $(STAMP)
	# FMR1_SMOKE=1: notebook 05 runs one seed (its outputs go to runs/<profile>/smoke/, not figures/).
	FMR1_SMOKE=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -q

# The tiers (markers assigned in tests/conftest.py); together they are exactly `make test`.
test-unit: $(STAMP)
	FMR1_SMOKE=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests -m unit -q

test-train: $(STAMP)
	FMR1_SMOKE=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests -m train -q

test-notebooks: $(STAMP)
	FMR1_SMOKE=1 MPLBACKEND=Agg $(BIN)/python -m pytest notebooks --nbval-lax --nbval-current-env -q

lint: $(STAMP)
	$(BIN)/ruff check fmr1lib tests bench scripts
	$(BIN)/ruff check notebooks

# The bench extra (TRL, compared against in bench/grpo_step.py) is installed once, never as a
# runtime dependency; one torch thread per process keeps the ratios stable on shared cores.
BENCH_STAMP := $(VENV)/.fmr1-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/attention_capture.py
	$(BIN)/python bench/grpo_step.py
	$(BIN)/python bench/scaling.py
	@echo "tables and JSON in runs/bench/ (bench/README.md explains them)"

clean-venv:
	rm -rf $(VENV)
