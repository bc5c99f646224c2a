VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench rescue clean

$(STAMP): requirements/test.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_gradwatch tests examples benchmarks
	$(VENV)/bin/ruff format --check lightning_gradwatch tests examples benchmarks
	$(VENV)/bin/mypy lightning_gradwatch

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

rescue: $(STAMP)
	$(PY) benchmarks/rescue.py

clean:
	rm -rf $(VENV) runs build *.egg-info
