# Two commands do all the set-up (see README): `make demo` and `make test`.
# Both create and reuse a virtual environment in .venv with the package installed (editable).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job. Training and evaluation land with later issues; until then the demo shows the
# installed toolkit and the paper's resolved recipe.
demo: $(STAMP)
	$(VENV)/bin/advgkl --version
	$(VENV)/bin/advgkl config configs/cifar10/gkl_wrn34_10.yaml
	@echo "advgkl: training and evaluation commands are not implemented yet (see README, Status)."

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
