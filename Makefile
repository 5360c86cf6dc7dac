# `make demo` and `make test` each create .venv and install flsec when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLOWER_STAMP := $(VENV)/.installed-flower

.PHONY: demo test test-flower lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The [flower] extra (flwr + ray, Python >= 3.11) installed into the same .venv.
$(FLOWER_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,flower]'
	touch $(FLOWER_STAMP)

demo: $(STAMP)
	$(BIN)/flsec demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -m "not slow"

# flsec on Flower: the engine, strategy and attacker tests, and the local deployment (slow).
test-flower: $(FLOWER_STAMP)
	$(BIN)/python -m pytest tests/test_flower.py tests/test_flower_config.py tests/test_flower_deployment.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs
