# Two commands on a fresh machine:  make demo  (the end-to-end demo)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
# timm needs torchvision; torch 2.14.1 + torchvision 0.29.1 is the pair that lies on this
# kind of machine's disk (the 2.13.0 CPU build has no importable torchvision beside it).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PIP     = $(VENV)/bin/python -m pip
STAMP   = $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv test test-all demo bench docs reference clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	# Name the torch pins again so the resolver can never swap them for another build.
	$(PIP) install -q -e '.[test]' $(TORCH)
	# DeepSpeed's CPU shared-memory all-reduce is C++ it would JIT-build in the first distill
	# run (~50 s on 2 cores); build it into torch's extension cache now.
	$(VENV)/bin/python -m fusedist.distill.prebuild
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# The default tier: CPU only, what CI runs.
test: venv
	$(VENV)/bin/python -m pytest -m "not gpu" -q --durations=25

# Everything, including GPU tests (run where a GPU is).
test-all: venv
	$(VENV)/bin/python -m pytest -q

demo: venv
	$(VENV)/bin/fusedist demo

bench: venv
	$(VENV)/bin/python benchmarks/tiling.py

# The docs site, offline, warnings as errors, into site/. It regenerates nothing: the config
# reference under docs/reference/ is committed (tests/test_docs.py fails when it is stale).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict --site-dir site

# Rewrite docs/reference/ from the config models (after changing a config field).
reference: venv
	$(VENV)/bin/python -m fusedist.docsgen

clean:
	rm -rf $(VENV) demo-output .pytest_cache site
