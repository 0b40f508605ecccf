# The two commands of the README: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test test-fast compile clean fashion-mnist

UV_VERSION := 0.13.9

# Reinstall only when the dependency set changes. uv resolves and installs the same pinned set
# as pip in about a third of the time (measured from an empty cache: ~47 s against ~140 s).
# The venv keeps its pip: each kfp.local step pip-checks its packages when it starts.
# Should uv not install (it reaches PyPI on its own, not through pip's configuration), pip
# installs the same set, only slower.
# Byte-compiled at install (both ways): with PYTHONDONTWRITEBYTECODE set, as on the CI machines,
# nothing is cached at import, and every pipeline step would recompile jax and mlflow from
# source (measured: not compiling saved ~47 s of install, cost ~100 s of tests).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION) \
	  && $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode --upgrade pip -e '.[test]' \
	  || { echo "uv could not install the project; installing with pip instead (slower)"; \
	       $(BIN)/python -m pip install --quiet --upgrade pip \
	       && $(BIN)/python -m pip install --quiet -e '.[test]'; }
	touch $(STAMP)

# Fashion-MNIST, a second source dataset for task families (`fashion_mnist_offline`,
# lopt/data/builders.py), is the original IDX files of Debian's package dataset-fashion-mnist
# (~30 MB), not a PyPI wheel. Installed when missing and this user may (root, or sudo that asks
# no password); otherwise a warning, and a family that lists it draws from its other sources.
# With LOPT_FASHION_MNIST_DIR set, the files are read from there and nothing is installed.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

fashion-mnist:
	@dir="$${LOPT_FASHION_MNIST_DIR:-$(FASHION_MNIST_DIR)}"; \
	if [ -f "$$dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi; \
	if [ -z "$$LOPT_FASHION_MNIST_DIR" ] && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else sudo=none; fi; \
	  if [ "$$sudo" != none ]; then \
	    echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    $$sudo apt-get update -qq \
	      && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	           dataset-fashion-mnist >/dev/null \
	      && exit 0; \
	  fi; \
	fi; \
	echo "warning: Fashion-MNIST's IDX files are not in $$dir, and they could not be installed here."; \
	echo "  Install them with 'sudo apt-get install dataset-fashion-mnist' (Debian), or set"; \
	echo "  LOPT_FASHION_MNIST_DIR to a directory holding train-images-idx3-ubyte.gz and the other"; \
	echo "  three files. Until then, task families that list fashion_mnist_offline draw from their"; \
	echo "  other sources."

run: $(STAMP) fashion-mnist
	$(BIN)/lopt run

# pytest exits 5 when it collected no tests; make would turn that into a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=12; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$status

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

compile: $(STAMP)
	$(BIN)/lopt compile -o lopt-pipeline.yaml

clean:
	rm -rf .lopt lopt-pipeline.yaml
