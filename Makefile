# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create .venv first if it is missing (tools/setup_venv.sh; idempotent, <1 s when present).
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv run test test-fast clean-venv

venv:
	@bash tools/setup_venv.sh

run: venv
	$(PY) -m megatron_tppo.train --config examples/tiny_cpu.yaml $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
