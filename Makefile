# make run  : set up .venv (first time) and run the seed's job: the default model cut into
#             2 parts, 2 ranks, warm-up + 16 Q&A, the performance table.
# make test : set up .venv (first time) and run the test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/python -m tpllama.kernels
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tpllama run

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
