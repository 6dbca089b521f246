# Two entry points for a fresh clone: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint typecheck data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[train,test,serve,ray]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian; install it when missing and the system allows it (root + apt).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "warning: could not install dataset-fashion-mnist"; \
	  else echo "warning: Fashion-MNIST missing; install the Debian package dataset-fashion-mnist or pass --data-root"; fi; \
	fi

demo: $(STAMP) data
	$(BIN)/python bench/demo.py

test: $(STAMP) data
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(MAKE) typecheck

# mypy on the rooms a deployment runs (config in pyproject.toml). The checkout itself is the abl_guard package, so a
# link named abl_guard in a temporary directory goes on MYPYPATH.
typecheck: $(STAMP)
	@d=$$(mktemp -d) && ln -s "$(CURDIR)" "$$d/abl_guard" && \
	  MYPYPATH="$$d" $(BIN)/mypy -p abl_guard.guard -p abl_guard.detectors -p abl_guard.export; \
	  rc=$$?; rm -rf "$$d"; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache *.egg-info
