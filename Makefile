# Two commands do all set-up on a fresh Debian machine with Python 3.11 (see README):
#   make demo   - the main job on the embedded default (offline, CPU)
#   make test   - the test suite
# Both create .venv and install what is missing; a second run skips finished set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision builds that lie on this project's machines' disk (pip takes them from there).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# robosuite without its declared dependencies (pyproject.toml's robosuite extra says why)
ROBOSUITE_SPEC ?= robosuite==1.5.2
STAMP := $(VENV)/.vla-ft-installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,lora,metaworld,lowmem,ray,robosuite]'
	$(PY) -m pip install -q --no-deps $(ROBOSUITE_SPEC)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) scripts/finetune.py --cfg pick_place.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
