# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Development and CI pin the torch pair that installs here; the package itself stays loose.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PIN)
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 $(PY) -m longvit demo

lint: $(STAMP)
	$(PY) -m ruff check longvit tests tools
	$(PY) -m ruff format --check longvit tests tools

test: $(STAMP) lint
	NO_ALBUMENTATIONS_UPDATE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
