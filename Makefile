# Set-up and entry points. `make run` installs everything into .venv and runs the main job on the
# embedded default config; `make test` installs the same and runs the test suite.
#
# torch: where the venv cannot import torch yet, TORCH (default torch==2.13.0, the CPU wheel
# this project is developed with) is installed first, and the package's own range (torch>=2.4)
# then adds nothing. On a cluster, build the venv on the site's CUDA torch instead:
#   module load <site pytorch module>
#   make install VENV_FLAGS=--system-site-packages
# The site's torch is then importable and stays as it is.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.lmprune-installed

.PHONY: install run test clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test,cluster]"
	touch $@

run: install
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-results:
	rm -rf results logs .snakemake/incomplete
