# smtpgw: the README's two commands, `make run` and `make test`, and the
# steps they are made of. Run as root on Debian 12; scripts/setup.sh installs
# what is missing and starts what is not running.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
SMTPGW      := $(VENV)/bin/smtpgw
CONFIG      ?= etc/smtpgw.toml
SINK_LISTEN ?= 127.0.0.1:2526
SINK_DIR    ?= var/mail
PYTEST_ARGS ?=
PYTEST_TIMEOUT ?= 30m

.PHONY: help run test lint pytest setup bench

help:
	@echo "make run    set up, start clamd and a capture sink on $(SINK_LISTEN), run the gateway in the foreground"
	echo "make test   set up (ClamAV, RabbitMQ, Redis, venv), then lint (ruff, mypy) and the test suite (pytest)"
	echo "make lint   ruff check and mypy --strict only"
	echo "make setup  install what is missing and start clamd, RabbitMQ and Redis (scripts/setup.sh)"
	echo "make bench  the benchmark against ClamSMTP and the ceilings (scripts/bench.sh; BENCH_ARGS=--quick)"

setup:
	@scripts/setup.sh

# The gateway in the foreground with etc/smtpgw.toml: it listens on
# 127.0.0.1:2525 and delivers mail for example.test to the sink, which writes
# each message to $(SINK_DIR)/new/. Ctrl-C stops the gateway and the sink this
# started; clamd keeps running (scripts/clamd.sh says how to stop it).
run:
	@scripts/setup.sh --without-rabbitmq --without-redis
	$(SMTPGW) check-config -c $(CONFIG)
	listen=$(SINK_LISTEN); sink_host=$${listen%:*}; sink_port=$${listen##*:}
	sink_up() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$$1/$$2"' _ "$$sink_host" "$$sink_port" 2>/dev/null; }
	if sink_up; then
	    echo "sink: something already listens on $(SINK_LISTEN); using it"
	else
	    mkdir -p $(SINK_DIR)
	    $(SMTPGW) sink --listen $(SINK_LISTEN) --dir $(SINK_DIR) &
	    sink_pid=$$!
	    trap 'kill $$sink_pid 2>/dev/null || true; wait $$sink_pid 2>/dev/null || true' EXIT
	    for _ in $$(seq 1 100); do sink_up && break; kill -0 $$sink_pid || exit 1; sleep 0.1; done
	    sink_up || { echo "sink did not start on $(SINK_LISTEN)" >&2; exit 1; }
	fi
	echo "smtpgw: mail for example.test lands in $(SINK_DIR)/new/; Ctrl-C stops the gateway"
	$(SMTPGW) run all -c $(CONFIG)

# Lint is part of `make test`: the standards want ruff and mypy --strict
# clean, so a lint failure fails the test command. It runs first because it is
# fast; pytest runs afterwards either way, so one run shows every problem, and
# its summary stays the last line.
test: setup
	@status=0
	$(MAKE) --no-print-directory lint || status=$$?
	$(MAKE) --no-print-directory pytest || status=$$?
	exit $$status

# mypy takes its files and --strict from pyproject.toml ([tool.mypy]).
lint:
	@status=0
	echo "+ ruff check ."
	$(VENV)/bin/ruff check . || status=$$?
	echo "+ mypy"
	$(VENV)/bin/mypy || status=$$?
	exit $$status

# CI=1 (set by .ci/run) makes a missing clamd or RabbitMQ fail the tests that
# need it instead of skipping them (tests/conftest.py). The suite should take
# well under 15 minutes; a hung test is stopped after PYTEST_TIMEOUT with
# SIGABRT, on which pytest's faulthandler prints every thread's stack
# (--foreground keeps pytest in the terminal's process group, so Ctrl-C works).
pytest:
	@echo "+ CI=$${CI:-} $(PY) -m pytest $(PYTEST_ARGS)"
	status=0
	CI=$${CI:-} timeout --foreground --signal=ABRT --kill-after=30s $(PYTEST_TIMEOUT) $(PY) -m pytest $(PYTEST_ARGS) || status=$$?
	if [ $$status = 124 ] || [ $$status = 134 ]; then
	    echo "pytest did not finish within $(PYTEST_TIMEOUT): a test hangs (stacks above)" >&2
	fi
	exit $$status

# The benchmark (README, "Benchmark"): installs its peers (Postfix's smtp-sink, ClamSMTP) and
# py-spy, then runs `python -m bench $(BENCH_ARGS)`; the report lands in bench/out/report.md.
BENCH_ARGS ?=
bench:
	@scripts/bench.sh $(BENCH_ARGS)
