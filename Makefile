# `make test`: create .venv, install the package with its test and deploy extras (exact versions from
# constraints.txt), run the whole suite. `make demo`: create .venv, install, run the main job.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# catalyst 22.4's wheel metadata is rejected by pip >= 24.1 ("invalid metadata"): keep pip below it.
	$(PY) -m pip install --quiet 'pip>=23,<24.1'
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,deploy,attribution]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m dnn_cool_catalyst.demo

clean:
	rm -rf $(VENV) build *.egg-info
