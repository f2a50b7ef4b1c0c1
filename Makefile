# Two entry points (README): `make quickstart` and `make test`. Both set up .venv first; setup is idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data
# The demo's faces: ORL when the shared data sits beside this checkout (400 faces: fits the demo's minutes; the
# colour CelebA faces take ~4x longer: `make quickstart DATA=../shared/data/celeba299`), else none given:
# `ipsr quickstart` then downloads LFW and says so (README, "Two commands").
DATA ?= $(firstword $(wildcard $(SHARED_DATA)/att_faces $(SHARED_DATA)/celeba299))
STAMP := $(VENV)/.installed

.PHONY: setup quickstart lint test clean

setup: $(STAMP)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned to the builds on local disk (pip finds them; uv/poetry would download ~3 GB).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: setup
	$(VENV)/bin/ipsr quickstart $(if $(DATA),--data $(DATA))

# The lint gate (ruff lint + format, mypy over the two lower layers), then the suite.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy ipsr_model ipsr_platform

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
