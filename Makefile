# Two commands for a new user: `make run` and `make test`. Everything installs from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RESLAB := $(VENV)/bin/reslab
SHARED := $(abspath ../shared/datasets)
export RESLAB_DATA ?= $(if $(wildcard $(SHARED)),$(SHARED),)

.PHONY: run test test-all install install-test system-deps ui demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test system-deps

# Debian packages the browser and PostgreSQL tests need (installed only when missing).
system-deps:
	@missing=""; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -n "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

run: install
	$(RESLAB) tune --preset make-run

# `make test`: the suite without the tests marked slow (servers, DDP processes, budgets). CI sets CI=true
# and runs everything, as does `make test-all`. Two passes: the suite on $(WORKERS) pytest-xdist workers (one
# training thread each; whole modules per worker, grouped by tests/conftest.py), then the tests marked serial
# alone, since they time themselves against wall-clock budgets that another worker's load would eat into.
WORKERS ?= 2
ONLY_FAST = $(if $(filter true 1,$(CI)),,and not slow)
define SUITE
$(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial $(1)"
$(PY) -m pytest -p no:xdist -m "serial $(1)"
endef

test: install-test
	$(call SUITE,$(ONLY_FAST))

test-all: install-test
	$(call SUITE,)

ui: install
	$(RESLAB) ui

demo: install
	$(RESLAB) demo

bench: install
	$(RESLAB) bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
