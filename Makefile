# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create .venv first if it is missing (tools/setup_venv.sh; idempotent, <1 s when present).
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv run test test-fast clean-venv

venv:
	@bash tools/setup_venv.sh

# The tiny default: build the SFT model and its value-pretrained critic once (tools/build_tiny_model.py,
# tools/pretrain_value.py; both idempotent), then train it with T-PPO.
# TensorBoard: .venv/bin/tensorboard --logdir runs/tiny/tensorboard
TINY_MODEL := .cache/tiny_sft

run: venv
	$(PY) tools/build_tiny_model.py --out $(TINY_MODEL)
	$(PY) tools/pretrain_value.py --model $(TINY_MODEL)
	$(PY) -m megatron_tppo.train --config examples/tiny_cpu.yaml model.hf_path=$(TINY_MODEL) \
		checkpoint.load_critic=$(TINY_MODEL)/value_critic $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
