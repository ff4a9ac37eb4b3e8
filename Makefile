# Two entry points: `make run` starts the appliance, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test install bench clean engines reliability bundle

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# model packs get their INT8 model and parity report once (build_engines.py) before the first start
engines: $(STAMP)
	@for pack in engines/*/manifest.toml; do \
	  [ -f "$$(dirname $$pack)/build.json" ] || { $(BIN)/python build_engines.py; break; }; \
	done

run: $(STAMP) engines
	APPLIANCE_HOME=$${APPLIANCE_HOME:-./var} APPLIANCE_DEMONSTRATION=$${APPLIANCE_DEMONSTRATION:-1} $(BIN)/appliance serve

# pytest exits 5 when it collects no test; that is not a failure of the product
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: $(STAMP)
	$(BIN)/python bench/load_series.py
	$(BIN)/python bench/memory_600.py
	$(BIN)/python build_engines.py
	$(BIN)/python bench/int8_vs_fp32.py
	$(BIN)/python bench/analyze_e2e.py
	$(BIN)/python bench/receive_throughput.py
	$(BIN)/python bench/web_pages.py
	$(BIN)/python bench/reliability.py

# the full reliability and security suite: 10,000 mutants, 100 kill -9 rounds (about 30 minutes)
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py --full

clean:
	rm -rf $(VENV) var .pytest_cache

# offline bundles for a USB stick: dist/appliance-<version>-linux-{x86_64,aarch64}.tar.gz, signed with the
# vendor key in APPLIANCE_VENDOR_KEY (a throwaway key, with a warning, when it is not set)
bundle: $(STAMP)
	$(BIN)/python packaging/build_bundle.py
