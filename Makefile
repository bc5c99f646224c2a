VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The oldest supported versions (the floors in pyproject.toml) in their own environment, tested
# the way Lightning's CI tests its oldest requirements. Never part of `make test`.
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.installed

# $(PY) $(PYTEST) [ARGS]: the suite, the same way in every environment.
PYTEST := -m pytest -q -p no:cacheprovider

.PHONY: setup test test-oldest lint demo bench rescue clean

# $(call install,VENV,REQUIREMENTS): a virtualenv with REQUIREMENTS and this package (editable).
define install
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(1)/.installed
endef

$(STAMP): requirements/test.txt pyproject.toml
	$(call install,$(VENV),requirements/test.txt)

$(OLDEST_STAMP): requirements/oldest.txt pyproject.toml
	$(call install,$(OLDEST_VENV),requirements/oldest.txt)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_gradwatch tests examples benchmarks
	$(VENV)/bin/ruff format --check lightning_gradwatch tests examples benchmarks
	$(VENV)/bin/mypy lightning_gradwatch
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(PY) $(PYTEST)

# The floor, checked by CI (.ci/run): the package imports under the oldest versions (the failure to
# read first), then the whole suite passes there.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -c "import lightning_gradwatch"
	$(OLDEST_PY) $(PYTEST)

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

rescue: $(STAMP)
	$(PY) benchmarks/rescue.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs build *.egg-info
