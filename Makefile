# Two commands for a fresh Debian 12 machine with Python 3.11:
#   make run    builds everything, creates a demo CA in ./scep-data if none exists, serves on 127.0.0.1:8080
#   make test   installs what the tests need (Debian peers included) and runs the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DIR ?= scep-data
BIND ?= 127.0.0.1:8080
# Seconds per fuzz harness: make fuzz, and the bounded run in make test.
FUZZ_SECONDS ?= 300
FUZZ_TEST_SECONDS ?= 25

NATIVE_SOURCES := $(wildcard native/src/*.c native/src/*.h native/include/*.h) native/build_native.py

.PHONY: run test deps test-deps lint sanitize hostile fuzz clean

# Build dependencies (compiler, OpenSSL headers, venv) from Debian, only when missing.
deps:
	@scripts/debian-packages.sh build

test-deps:
	@scripts/debian-packages.sh build test

$(VENV)/.installed: pyproject.toml setup.py $(NATIVE_SOURCES) scep_fast/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: deps $(VENV)/.installed
	@test -f $(DIR)/scep-fast.toml || $(VENV)/bin/scep-fast init --dir $(DIR) --bind $(BIND)
	@echo "SCEP URL:  http://$(BIND)/scep"
	@echo "challenge: $$(cat $(DIR)/challenge)"
	$(VENV)/bin/scep-fast serve --dir $(DIR) --bind $(BIND)

test: test-deps $(VENV)/.installed
	$(VENV)/bin/ruff check scep_fast tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q
	PYTHON=$(abspath $(PY)) bash tests/native/sanitize.sh
	PYTHON=$(abspath $(PY)) bash tests/fuzz/run.sh $(FUZZ_TEST_SECONDS)

sanitize: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) bash tests/native/sanitize.sh

# The hostile-input test at length: HOSTILE mutated PKCSReqs among valid enrollments.
HOSTILE ?= 22000
hostile: $(VENV)/.installed
	SCEP_FAST_HOSTILE_MESSAGES=$(HOSTILE) SCEP_FAST_HOSTILE_SECONDS=900 \
		$(PY) -m pytest -q -s tests/integration/test_hostile_pkcsreq.py

# Every fuzz harness for FUZZ_SECONDS; the corpora grow in build/fuzz-corpus.
fuzz: test-deps $(VENV)/.installed
	FUZZ_CORPUS=$(abspath build/fuzz-corpus) PYTHON=$(abspath $(PY)) bash tests/fuzz/run.sh $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info scep_fast/_native*.so native/_native_build
