# Two commands do all the set-up on a fresh clone:
#   make course   install, then execute every lesson with papermill into build/course (+ HTML)
#   make test     install, then run the test suite (what CI runs)
PYTHON ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: install course test lab diagrams

install:
	@# keep an installed torch (a CUDA build on a GPU box); otherwise the CPU build, never a CUDA download
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -r requirements.txt

course: install
	$(PYTHON) -m launcher.course $(COURSE_ARGS)

test: install
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

lab: install
	$(PYTHON) -m pip install --quiet jupyterlab
	cd notebooks && $(PYTHON) -m jupyterlab

diagrams:
	$(PYTHON) images/make_diagrams.py
