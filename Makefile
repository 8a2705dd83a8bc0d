# The README's two commands: `make demo` and `make test`; `make test-fast` skips the slow
# (multi-process, end-to-end) tests; `make lint` is ruff's check and format check. Both build the same virtual
# environment (with the QLoRA and DeepSpeed extras, whose tests run on the CPU, and the studies' extra that the
# demo needs); torch is the CPU wheel 2.13.0 when no torch is present.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.iftune-installed

.PHONY: demo test test-fast lint install clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,eval,qlora,deepspeed,studies]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/iftune

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
