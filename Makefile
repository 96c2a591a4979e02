# Long-sequence attention benchmark. `make` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GRID ?= auto
SCALE ?= auto
SEEDS ?=
JOBS ?= auto
RESULTS ?= results
SMOKE_RESULTS ?= results/smoke
SPEED_ARGS ?=
# the speed sweep of `make benchmark`: the attention layer alone, every mechanism, 256 to 16K tokens
BENCH_SPEED_ARGS ?= modes=[attention] causal=[false] lengths=[256,1024,4096,16384] threads=2 timeout_s=40 min_time_s=0.5

help: ## show this help
	@grep -hE '^[a-z][a-z-]*:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: SCALE=auto|tiny|small|lra  GRID=auto|cpu|default|length|smoke  SEEDS=0,1,2  JOBS=auto|N  RESULTS=results  SMOKE_RESULTS=results/smoke  SPEED_ARGS='threads=1 lengths=[256,1024]'"

install: $(STAMP) ## create .venv and install torch==2.13.0, then the project with [dev] and the peer plugins, at the versions of constraints.txt

$(STAMP): pyproject.toml plugins/peers/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet -c constraints.txt -e plugins/peers
	touch $@

# pip's resolver, run dry against what .venv holds (pip freeze as constraints), names every package that
# torch, .[dev] and the peers need and its version; constraints.txt is that list (the projects themselves left out)
constraints: install ## regenerate constraints.txt from the versions installed in .venv (after changing dependencies)
	$(PY) -m pip freeze --exclude-editable > $(VENV)/freeze.txt
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/resolved.json -c $(VENV)/freeze.txt \
	  torch==2.13.0 -e ".[dev]" -e plugins/peers
	$(PY) -c 'import json, sys; \
	  pins = sorted(((p["metadata"]["name"], p["metadata"]["version"].split("+")[0]) for p in json.load(open(sys.argv[1]))["install"]), key=lambda p: p[0].lower()); \
	  print("# The versions CI tested: make install installs with -c constraints.txt. Regenerate with make constraints"); \
	  print("# (pip resolves torch==2.13.0, .[dev] and plugins/peers against the packages .venv holds)."); \
	  print("\n".join(f"{n}=={v}" for n, v in pins if n.lower() not in ("longbench", "harness-peers")))' \
	  $(VENV)/resolved.json > constraints.txt

data: install ## prepare every task's offline data (fetches the Debian packages it needs)
	$(PY) -m harness data task=all scale=$(if $(filter auto,$(SCALE)),small,$(SCALE))

# the report of `make benchmark` replaces the leaderboard whatever it was built from (the run just made
# its records); `make report` alone refuses to replace one built from more records than the folder holds
benchmark: install ## the grid (GPU: default at scale=lra; CPU: grid=cpu at small), the speed sweep, the leaderboard
	started=$$(date +%s); \
	$(PY) -m harness grid grid=$(GRID) scale=$(SCALE) n_jobs=$(JOBS) results_dir=$(RESULTS) $(if $(SEEDS),seeds=$(SEEDS)); \
	status=$$?; $(PY) -m harness speed results_dir=$(RESULTS) $(BENCH_SPEED_ARGS); \
	mkdir -p $(RESULTS)/runs; \
	printf '{"started": %s, "finished": %s, "grid_status": %s, "command": "make benchmark GRID=$(GRID) SCALE=$(SCALE) JOBS=$(JOBS)"}\n' \
	  $$started $$(date +%s) $$status > $(RESULTS)/runs/make_benchmark.json; \
	$(PY) -m harness report results_dir=$(RESULTS) force=true || exit $$?; \
	if [ $$status -ne 0 ]; then echo "make benchmark: the leaderboard is written, but some cells did not finish ok (grid exit status $$status): see its Run details; retry them with: $(PY) -m harness grid grid=$(GRID) scale=$(SCALE) rerun=failed train.time_limit_s=0"; fi; \
	exit $$status

smoke: install ## 2 tasks x softmax and one mechanism per family at scale=tiny (harness/conf/grid/smoke.yaml, minutes on 2 cores), then its leaderboard in results/smoke
	$(PY) -m harness grid grid=smoke scale=tiny n_jobs=$(JOBS) results_dir=$(SMOKE_RESULTS) $(if $(SEEDS),seeds=$(SEEDS)); \
	status=$$?; $(PY) -m harness report results_dir=$(SMOKE_RESULTS) || exit $$?; exit $$status

speed: install ## speed and memory of every mechanism across sequence lengths (results/speed/)
	$(PY) -m harness speed results_dir=$(RESULTS) $(SPEED_ARGS); \
	status=$$?; $(PY) -m harness report results_dir=$(RESULTS) || exit $$?; exit $$status

report: install ## regenerate results/leaderboard.md and results/plots/ from the results
	$(PY) -m harness report results_dir=$(RESULTS)

test: lint ## make lint, the fast test suite, then the packaging tests: the wheel and a grid through submitit (what CI runs)
	$(PY) -m pytest -q -m "not slow" -n 2
	$(PY) -m pytest -q -p no:cacheprovider -m slow -n 2 --dist loadfile tests/test_wheel.py tests/test_submitit.py

wheel-test: install ## build the wheels, install them (not editable) in a fresh venv, run `harness list` and a tiny cell
	$(PY) -m pytest -q -p no:cacheprovider tests/test_wheel.py

test-all: install ## every test, slow ones included
	$(PY) -m pytest -q -n 2

lint: install ## ruff check, ruff format --check, the import layers of harness/ (lint-imports), mypy on harness/ (settings in pyproject.toml)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

.PHONY: help install constraints data benchmark smoke speed report test wheel-test test-all lint
