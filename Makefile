# Two entry points (README): `make quickstart` and `make test`. Both set up .venv first; setup is idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/att_faces
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test clean

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
	$(VENV)/bin/ipsr quickstart --data $(DATA)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
