# Each target sets up .venv itself, so a fresh clone needs nothing but `make test` or `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MNIST_MIRROR ?=
export MNIST_MIRROR

.PHONY: venv tools test test-stack test-policies test-browser test-faults lint demo down bench clean

# torch first, by pip, from the CPU build it finds on disk by exact version (uv does not look there): with it installed,
# nothing resolves a CUDA build. Then uv installs the rest, keeping that torch (2.13.0+cpu meets the pin): a minute on a
# fresh clone where pip took two and a half. uv compiles the bytecode too, as pip does and uv does not by default:
# where PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile Airflow, moto and the providers from
# source each time it imports them, twice the CPU of an import.
# The local AWS evaluates IAM policies with @cloud-copilot/iam-simulate, a node program of its own (local_aws/evaluator.py
# says why): npm installs it from its lock file.
$(STAMP): pyproject.toml local_aws/iam_simulate/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" "uv>=0.5"
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev]"
	npm ci --prefix local_aws/iam_simulate --no-audit --no-fund --loglevel=error
	touch $@

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The compose test validates with Debian's docker-compose; the browser test drives Debian's chromium; the endpoint
# bench loads the servers with Debian's wrk.
tools:
	@command -v docker-compose >/dev/null && command -v chromium >/dev/null && command -v wrk >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker-compose chromium wrk; }

test: lint tools
	$(BIN)/pytest

# The local stack for real, `up` to `down` (tests/test_stack.py, four minutes): CI runs it after `make test`.
test-stack: venv tools
	$(BIN)/pytest -m stack -n 0

# Every kind of run on the local stack under exactly the shipped IAM policies, and each statement proven needed
# (tests/test_policies.py, minutes): CI runs it after `make test`.
test-policies: venv tools
	$(BIN)/pytest -m policies -n 0 -s

# The UI in headless Chromium against a local stack (tests/test_browser.py, a minute or two): CI runs it after `make test`.
test-browser: venv tools
	$(BIN)/pytest -m browser -n 0

# The proofs that take minutes, apart from `make test` to keep it under ten: the sweep's safety paths end to end
# (tests/test_safe_deploy.py), the seed recipe on the official MNIST, drift on real traffic (tests/test_drift.py,
# whose figures it prints), and the images named as the SageMaker SDK names them (it imports the SDK). CI runs them
# after `make test`.
test-long: venv tools
	$(BIN)/pytest -m long -n 0 -s

# Faults on the real local stack (tests/test_faults.py, minutes each): CI runs them after `make test`.
test-faults: venv tools
	$(BIN)/pytest -m fault -n 0

# Starts the local stack (Airflow UI, local AWS), runs the seed sweep, asks the endpoint; leaves it all running.
demo: venv
	$(BIN)/mnist-pipeline demo

down: venv
	$(BIN)/mnist-pipeline down

bench: venv tools
	mkdir -p bench/results
	$(BIN)/python bench/bench_training.py --out bench/results/training.json
	$(BIN)/python bench/bench_validation.py --out bench/results/validation.json
	$(BIN)/python bench/bench_parse.py --out bench/results/parse.json
	$(BIN)/python bench/bench_endpoint.py --out bench/results/endpoint.json
	$(BIN)/python bench/bench_transform.py --mirror $${MNIST_MIRROR:-../shared/mnist} --out bench/results/transform.json
	$(BIN)/python bench/bench_sweep.py --mirror $${MNIST_MIRROR:-../shared/mnist} --out bench/results/sweep.json
	$(BIN)/python bench/bench_drift.py --out bench/results/drift.json
	$(BIN)/python bench/bench_drift_check.py --mirror $${MNIST_MIRROR:-../shared/mnist} --out bench/results/drift_check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts local_aws/iam_simulate/node_modules
