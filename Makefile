# Two entry points, both self-installing:
#   make demo   build the embedded dataset, train the quickstart model, decode from its checkpoint
#   make test   run the whole test suite (CPU, Pallas in interpret mode)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= workdirs/quickstart
# Where the datasets are built and cached (kept between runs).
export SWIFTLM_DATA_DIR ?= $(CURDIR)/data

.PHONY: demo test install install-dev clean

# The stamp files are rebuilt whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) -m experiments.launch --gin_file=experiments/configs/quickstart.gin \
	    --workdir=$(WORKDIR) --demo

test: $(VENV)/.installed-dev
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist worksteal -q tests

clean:
	rm -rf $(VENV) workdirs
