# Two commands on a fresh machine: `make serve` starts the server, `make test` runs the tests.
# Both create .venv and install the project (torch==2.14.1 and torchvision==0.29.1 are pinned).
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
PLAYGROUND := server/playground/node_modules/.package-lock.json

.PHONY: serve test lint bench bench-body bench-objects redis-server playground chromium

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# The playground's 3D viewer comes from npm (server/playground/package-lock.json); the server serves it.
$(PLAYGROUND): server/playground/package-lock.json
	cd server/playground && npm ci --no-audit --no-fund --loglevel=error
	touch $@

playground: $(PLAYGROUND)

serve: $(INSTALLED) $(PLAYGROUND)
	$(VENV)/bin/sam3-serve serve $(ARGS)

test: $(INSTALLED) $(PLAYGROUND) redis-server chromium
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The Redis tests start Debian's redis-server themselves; install it when the machine lacks it.
redis-server:
	@command -v redis-server >/dev/null || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# The playground test drives Debian's chromium headless through chromium-driver; install them when missing.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m server.docs --check

bench: $(INSTALLED)
	$(VENV)/bin/python -m benchmarks.sam3_image $(ARGS)

bench-body: $(INSTALLED)
	$(VENV)/bin/python -m benchmarks.sam3d_body $(ARGS)

bench-objects: $(INSTALLED)
	$(VENV)/bin/python -m benchmarks.sam3d_objects $(ARGS)
