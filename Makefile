# Two commands do all the set-up (see README): `make demo` and `make test`.
# Both create and reuse a virtual environment in .venv with the package installed (editable).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test check clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: GKL adversarial training on the embedded digits data, then standard AutoAttack
# on its 360 test images, on the CPU (about 2 minutes). Each run gets its own folder and record
# name, so nothing earlier is overwritten.
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(VENV)/bin/advgkl train configs/demo/digits_gkl.yaml run.name=$(DEMO_RUN)
	$(VENV)/bin/advgkl eval checkpoints/$(DEMO_RUN)/last.pt --n-examples 360 --eps 32/255 \
		--batch-size 360 --out results
	@echo "demo: checkpoints/$(DEMO_RUN)/ (metrics.csv, curves.png, last.pt) and results/digits/Linf/$(DEMO_RUN).json"

# The whole suite, split over the cores by pytest-xdist, one test file per worker at a time so
# that a file's trained fixtures are built once (JOBS=1: one process).
JOBS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope

# The fast tier for the edit loop: everything but the end-to-end tests marked slow.
check: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
