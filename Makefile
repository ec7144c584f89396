# The commands the README names. Everything installs into .venv; data lives in .data/ (git-ignored).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install services-stop lint typecheck bench chaos

# Install everything, migrate, load the demo, start the web server and the worker.
run: $(STAMP) .env
	$(PY) manage.py migrate --noinput
	$(PY) manage.py agentflow_demo
	$(PY) manage.py agentflow_run

# Install everything and run the whole test suite (what .ci/run calls). The browser tests need Chromium.
test: $(STAMP)
	.ci/ensure-chromium
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-logo
	$(PY) -m mypy
	DJANGO_SETTINGS_MODULE=tests.settings $(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
		echo "python3 -m venv failed; installing python3-venv"; \
		apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

# A development .env: debug on and a random secret key. Edit it to add ANTHROPIC_API_KEY.
# umask 077: it holds secrets, so only its owner may read it (mode 0600).
.env:
	@umask 077 && printf 'DJANGO_DEBUG=true\nDJANGO_SECRET_KEY=%s\n# The demo is the seed'"'"'s support agent; the un-prefixed API paths address it.\nAGENTFLOW_DEFAULT_AGENT=support\n# ANTHROPIC_API_KEY=sk-ant-...\n' \
		"$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > .env
	@echo "wrote .env (development settings)"

services-stop: $(STAMP)
	$(PY) manage.py agentflow_services stop

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/turn_overhead.py

# The full chaos suite (docs/operations.md, "Chaos suite"): its own stack, six faults, one table.
chaos: $(STAMP)
	$(PY) -m tests.chaos.run
