# The two commands: `make demo` and `make test`. Both set themselves up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs lint install clean bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The end-to-end demo on the embedded digits-shift dataset (about 20 min on 2 CPU cores; `e2kd demo --quick`: ~2 min).
demo: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/e2kd demo --out demo-out

test: $(STAMP) docs
	$(BIN)/ruff check e2kd tests bench examples tools
	$(BIN)/mypy
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q --durations=15 tests

# The documentation site (docs/, mkdocs.yml) into site/; warnings are errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_cache.py --out bench/RESULTS.md
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_train.py --out bench/RESULTS.md
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_s3.py --out bench/RESULTS.md
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_imagenet.py --out bench/RESULTS.md
	$(BIN)/python bench/bench_explainers.py --out bench/RESULTS.md
	$(BIN)/python bench/bench_logits.py --out bench/RESULTS.md
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_teachers.py --out bench/RESULTS.md
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python bench/bench_formats.py --out bench/RESULTS.md
	$(BIN)/python bench/bench_scale.py --out bench/RESULTS.md
	$(BIN)/python bench/bench_order.py --out bench/RESULTS.md
	$(BIN)/python bench/bench_sync.py --out bench/RESULTS.md

clean:
	rm -rf $(VENV) demo-out site .pytest_cache
