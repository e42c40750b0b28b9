# sessmob — the README's two commands are `make demo` and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit netns ctest lint bench clean

setup:
	@bash scripts/bootstrap.sh

## Bring up the namespace testbed and move a live streaming connection ed <-> id ten times.
demo: setup
	$(PY) -m netns_testbed demo

## The whole suite: lint, C tests (plain and ASan/UBSan), unit and namespace tests.
test: setup lint ctest
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

netns: setup
	$(PY) -m pytest -q tests/netns $(PYTEST_ARGS)

ctest:
	$(MAKE) -C csrc/tests test test-asan

lint: setup
	.venv/bin/ruff check sessmob netns_testbed tests
	.venv/bin/ruff format --check sessmob netns_testbed tests
	.venv/bin/mypy

## Benchmarks (root): the raw move, then RM moves against it; JSON in bench-results/.
bench: setup
	@mkdir -p bench-results
	$(PY) -m netns_testbed bench tcp --runs 200 --json bench-results/tcp.json
	.venv/bin/sessmob bench --runs 200 --json bench-results/rm.json

clean:
	rm -rf build *.egg-info sessmob/_native/*.so csrc/tests/bin .pytest_cache .mypy_cache
