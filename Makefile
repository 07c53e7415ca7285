# make run   - every notebook on the tiny profile (batch runner), then the summary
# make test  - every notebook via nbmake, then the unit and bad-input tests
# make lab   - JupyterLab on the notebooks
# Each bootstraps .venv first (env/setup.sh) when it is missing or requirements.txt changed.
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= tiny
# make test BROWSER=0 skips the real-browser test (never under CI=true)
BROWSER ?= 1
export KNOWLM_BROWSER := $(BROWSER)
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: venv browser run test lab clean
venv:
	@bash env/setup.sh

browser:
	@bash env/browser.sh

run: venv
	$(PY) -m knowlm_nb.batch --profile $(PROFILE)

test: venv browser
	$(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=1800 notebooks tests

lab: venv
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf runs
