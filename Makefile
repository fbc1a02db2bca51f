# Two commands do all the set-up on a fresh clone:
#   make course   install, then execute every lesson with papermill into build/course (+ HTML)
#   make test     install, then lint and run the test suite (what CI runs)
PYTHON ?= python3
# Where torch comes from when none is installed. The course's own machines serve the CPU build
# of torch==2.13.0 from their package index; elsewhere on Linux, PyPI's torch is a CUDA build of
# several GB, so pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
TORCH_INDEX ?=

.PHONY: install course test lint lab diagrams bench

install:
	@# keep an installed torch (e.g. a CUDA build on a GPU box); otherwise install torch==2.13.0
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PYTHON) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@# the course itself (lessons_lib and launcher), editable, with requirements.txt as its dependencies
	$(PYTHON) -m pip install --quiet -e .

course: install
	$(PYTHON) -m launcher.course $(COURSE_ARGS)

lint:
	$(PYTHON) -m ruff check .

test: install lint
	@# the slowest tests are listed at the end, to see where CI's time goes
	$(PYTHON) -m pytest -q tests --durations=30 $(PYTEST_ARGS)

lab: install
	$(PYTHON) -m pip install --quiet jupyterlab
	cd notebooks && $(PYTHON) -m jupyterlab

diagrams:
	$(PYTHON) images/make_diagrams.py

bench: install
	$(PYTHON) -m torch.distributed.run --standalone --nproc-per-node 2 -m lessons_lib.lab.bench --shape small $(BENCH_ARGS)
