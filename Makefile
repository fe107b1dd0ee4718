# The two commands: `make demo` and `make test`. Both set themselves up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Until `e2kd demo` exists: the quickest end-to-end path (dataset -> Ray-parallel teacher cache -> inspect/verify).
demo: $(STAMP)
	$(BIN)/python examples/quickstart.py
	$(BIN)/e2kd make-dataset digits-shift --out demo-out/data
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/e2kd cache-teacher --config configs/demo-digits.yaml \
		--data 'demo-out/data/train-{000000..000001}.tar' --out demo-out/cache-full
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/e2kd cache-teacher --config configs/demo-digits.yaml \
		--data 'demo-out/data/train-{000000..000001}.tar' --out demo-out/cache-views8 --views 8
	$(BIN)/e2kd inspect demo-out/cache-full
	$(BIN)/e2kd inspect demo-out/cache-views8
	$(BIN)/e2kd verify demo-out/cache-views8

test: $(STAMP)
	$(BIN)/ruff check e2kd tests bench examples
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_cache.py --out bench/RESULTS.md
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_train.py --out bench/RESULTS.md

clean:
	rm -rf $(VENV) demo-out .pytest_cache
