# deepnet-fairseq: two commands do everything on a fresh machine.
#   make demo   create .venv, install, run the demo on the bundled Tatoeba data
#   make test   same set-up, then the test suite
#
# GPU users keep their own CUDA build of torch:
#   make TORCH='torch==2.13.0+cu126' TORCH_INDEX=https://download.pytorch.org/whl/cu126 test
#   make TORCH=none test     (install no torch: the venv must already have one)

PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
FAIRSEQ ?= fairseq-fixed==0.12.3.1

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The stamp is keyed on everything that decides what gets installed, so a changed
# requirement list reinstalls and an unchanged one installs nothing.
SETUP_KEY := $(shell cat requirements.txt requirements-dev.txt setup.py 2>/dev/null | \
	{ cat; echo '$(TORCH) $(TORCH_INDEX) $(FAIRSEQ)'; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(SETUP_KEY)

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(PIP) install --upgrade pip setuptools wheel
ifneq ($(TORCH),none)
	$(PIP) install '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
endif
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	@# fairseq-fixed's metadata hard-requires torchaudio (which would pull an old
	@# multi-GB CUDA torch); its real runtime needs are in requirements.txt.
	@# Its C++/Cython extensions compile against the torch and numpy installed above.
	$(PIP) install --no-deps --no-build-isolation '$(FAIRSEQ)'
	$(PIP) install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import fairseq, deepnet_fairseq; print('fairseq', fairseq.__version__, 'ready')"
	@touch $@

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

bench: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: setup
	$(BIN)/python -m ruff check deepnet_fairseq tests scripts benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
