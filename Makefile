# The two commands of the README: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test test-fast compile clean

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

run: $(STAMP)
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
