# `make demo` and `make test` each create .venv and install flsec when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLOWER_STAMP := $(VENV)/.installed-flower

.PHONY: demo test test-crash test-portable test-flower lint bench clean

# The tests whose numbers depend on floating-point kernels (optimisers, vectorised and sequential paths,
# precisions, aggregation rules): `make test-portable` runs them again on PyTorch's portable kernels.
NUMERIC_TESTS := tests/test_inversion_batched.py tests/test_inversion.py tests/test_inversion_geiping.py \
	tests/test_engines.py tests/test_runtime.py tests/test_aggregation.py tests/test_training.py

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
	$(BIN)/python -m pytest -m "not slow and not crash"

# The full SIGKILL campaigns: training, inversion and `flsec run` killed at every commit point, then resumed
# (minutes of subprocesses; `make test` keeps one kill-and-resume of training).
test-crash: $(STAMP)
	$(BIN)/python -m pytest -m crash

# The numerical tests once more without SIMD kernels (ATEN_CPU_CAPABILITY=default), so that a result that
# holds only with the kernels of one CPU fails here, not on a user's machine.
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -m "not slow and not crash" $(NUMERIC_TESTS)

# flsec on Flower: the engine, strategy and attacker tests, and the local deployment (slow).
test-flower: $(FLOWER_STAMP)
	$(BIN)/python -m pytest tests/test_flower.py tests/test_flower_config.py tests/test_flower_deployment.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs
