# `make test` and `make book` create .venv when missing, install the project once, then do their job.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the JavaScript the book's pages load (package-lock.json); npm ci writes this file last
NPM_STAMP := node_modules/.package-lock.json
export PYTHONDONTWRITEBYTECODE := 1
export SDL_VIDEODRIVER ?= dummy
export MPLBACKEND ?= Agg

.PHONY: install test test-package test-book book benchmarks clean

install: $(STAMP) $(NPM_STAMP)

# torch first, pinned to the CPU wheel, so that no multi-GB CUDA build is pulled on a CPU
# machine; a torch already in .venv (for example a CUDA build installed by hand) is kept.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts

test: test-package test-book

test-package: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/test_book_browser.py

# the browser test needs Chromium (Debian: apt-get install chromium); WM_CHROMIUM names another
test-book: $(STAMP) $(NPM_STAMP)
	WM_SCALE=tiny $(PY) -m pytest -p no:cacheprovider -q --nbval-lax --nbval-current-env --nbval-sanitize-with book/sanitize.cfg book/*.ipynb
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	WM_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/test_book_html.py tests/test_book_browser.py

book: $(STAMP) $(NPM_STAMP)
	$(PY) book/make_figures.py
	WM_SCALE=book $(PY) book/execute.py
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

benchmarks: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf _build .pytest_cache node_modules
