# roi-ops ui in a real browser (docs/ui.md): tests/ui/ui_browser.py, headless Debian Chromium driven by Playwright.
#   make ui-test                              run it; screenshot in build/ui-test/ui.png
#   make ui-test UI_SCREENSHOT=docs/img/ui.png  refresh the screenshot docs/ui.md shows
# Installs what it needs: Debian's chromium (apt-get, as root) when /usr/bin/chromium is missing, and Playwright
# (pip) into .venv, driving that Chromium (Playwright's own browser download is not used). .ci/run runs it; the
# Chromium install alone took under 2 minutes here (see docs/ui.md).
UI_SCREENSHOT ?= build/ui-test/ui.png
CHROMIUM ?= /usr/bin/chromium

.PHONY: ui-test

ui-test: build
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium (apt-get)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright
	CHROMIUM=$(CHROMIUM) UI_SCREENSHOT=$(abspath $(UI_SCREENSHOT)) $(PY) -m pytest -q -p no:cacheprovider tests/ui/ui_browser.py
	@echo "screenshot: $(UI_SCREENSHOT)"
