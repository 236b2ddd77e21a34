"""``roi-ops ui`` in a real browser (headless Debian Chromium driven by Playwright), on the toy model.

Not part of ``make test`` (it needs Chromium and about a minute): ``make ui-test`` installs Playwright and
Chromium and runs this file. The screenshot goes to ``$UI_SCREENSHOT`` (default ``build/ui-test/ui.png``;
``make ui-test UI_SCREENSHOT=docs/img/ui.png`` refreshes the one docs/ui.md shows).

As a person would: load the page, draw two boxes with the mouse (one drawn elsewhere and moved into place, one
drawn small and resized by its corner), draw a third and delete it, type the captions, set the steps, click
Generate with one caption missing (a message, no stack trace), then with both, wait for the image, check the
colours in its boxes, export the layout and compare it with what was drawn, delete all boxes, import the exported
file and check the export round-trips, and take the screenshot.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest

import ui_helpers as uh

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
SCREENSHOT = pathlib.Path(os.environ.get("UI_SCREENSHOT", uh.ROOT / "build" / "ui-test" / "ui.png"))
STEPS = 20
#: What the mouse leaves: a box corner lands on a whole CSS pixel of the canvas (576 px wide here).
PIXEL_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with uh.serve(tmp_path_factory.mktemp("ui") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, wait_until="networkidle")
        page.wait_for_selector(".roi-canvas")
        page.errors = errors
        yield page
        browser.close()


class Canvas:
    """Mouse actions at fractions of the canvas."""

    def __init__(self, page):
        self.page = page
        self.rect = page.locator(".roi-canvas").bounding_box()

    def at(self, x: float, y: float) -> tuple[float, float]:
        return self.rect["x"] + x * self.rect["width"], self.rect["y"] + y * self.rect["height"]

    def drag(self, start, end):
        self.page.mouse.move(*self.at(*start))
        self.page.mouse.down()
        self.page.mouse.move(*self.at(*end), steps=8)
        self.page.mouse.up()

    def drag_handle(self, index: int, corner: str, end):
        handle = self.page.locator(f'.roi-box[data-index="{index}"] .roi-handle[data-corner="{corner}"]')
        box = handle.bounding_box()
        self.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        self.page.mouse.down()
        self.page.mouse.move(*self.at(*end), steps=8)
        self.page.mouse.up()


def boxes_on_canvas(page) -> int:
    return page.locator(".roi-canvas .roi-box").count()


def exported(page) -> str:
    """Click Export; the layout file's text, fetched from its download link once the link changes (a file with
    the same content gets the same link: export something else in between)."""
    before = page.locator("#roi-exported a").first.get_attribute("href") if page.locator("#roi-exported a").count() \
        else None
    page.click("#roi-export")
    link = page.locator("#roi-exported a").first
    page.wait_for_function(
        "(before) => { const a = document.querySelector('#roi-exported a'); return a && a.href && a.href !== before; }",
        arg=before, timeout=30_000)
    text = page.request.get(link.get_attribute("href")).text()
    return text


def test_draw_generate_export_import(page, tmp_path):
    canvas = Canvas(page)
    red, blue = uh.INSTANCES[0]["box"], uh.INSTANCES[1]["box"]
    page.fill("#roi-prompt textarea", uh.PROMPT)

    # box 0: drawn lower down, then moved into place by dragging its middle
    shift = 0.3
    canvas.drag((red[0], red[1] + shift), (red[2], red[3] + shift))
    assert boxes_on_canvas(page) == 1
    page.keyboard.type(uh.INSTANCES[0]["caption"])  # the new box's caption field has the focus
    middle = ((red[0] + red[2]) / 2, (red[1] + red[3]) / 2 + shift)
    canvas.drag(middle, (middle[0], middle[1] - shift))

    # box 1: drawn small, then resized by its bottom-right corner; its caption stays empty for now
    canvas.drag((blue[0], blue[1]), (blue[0] + 0.1, blue[1] + 0.1))
    canvas.drag_handle(1, "se", (blue[2], blue[3]))
    assert boxes_on_canvas(page) == 2

    # a third box, deleted with its x button; a fourth, deleted with the Delete key once selected
    canvas.drag((0.6, 0.05), (0.9, 0.3))
    assert boxes_on_canvas(page) == 3
    page.click('.roi-row:nth-child(3) .roi-delete')
    canvas.drag((0.1, 0.6), (0.3, 0.9))
    assert boxes_on_canvas(page) == 3
    page.mouse.click(*canvas.at(0.2, 0.75))  # select it (and focus the canvas)
    page.keyboard.press("Delete")
    assert boxes_on_canvas(page) == 2

    # Generate with box 1's caption missing: a message in the page, no stack trace, no image
    steps = page.locator("#roi-steps input[type=number]")
    steps.fill(str(STEPS))
    steps.press("Enter")
    page.click("#roi-generate")
    page.get_by_text("instances[1].caption must be a non-empty string").first.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()
    for close in page.locator(".toast-close").all():  # dismiss it (it would cover the screenshot)
        close.click()
    page.wait_for_function("document.querySelectorAll('.toast-item').length === 0", timeout=10_000)

    page.fill('.roi-caption[data-index="1"]', uh.INSTANCES[1]["caption"])
    page.click("#roi-generate")
    page.wait_for_selector("#roi-status:has-text('Generated a 32 x 32 image with 2 instance(s)')", timeout=120_000)
    assert f"{STEPS} steps" in page.inner_text("#roi-status")

    # the layout as drawn: export it and compare with the intended boxes
    text = exported(page)
    layout = json.loads(text)
    assert layout["prompt"] == uh.PROMPT and (layout["width"], layout["height"]) == (32, 32)
    assert [i["caption"] for i in layout["instances"]] == [i["caption"] for i in uh.INSTANCES]
    for got, want in zip(layout["instances"], uh.INSTANCES):
        assert all(abs(g - w) <= PIXEL_TOLERANCE for g, w in zip(got["box"], want["box"])), (got, want)

    # the generated image has both colours in the boxes drawn
    src = page.locator("#roi-image img").get_attribute("src")
    image_path = tmp_path / "image.png"
    image_path.write_bytes(page.request.get(src).body())
    results = uh.colours_in_boxes(image_path, layout["instances"])
    assert all(r["color_ok"] for r in results), results
    assert page.locator("#roi-overlay img").count() == 1
    assert page.locator("#roi-blend-maps img").count() >= 3  # two instances + the global share

    # round trip: delete every box, import the exported file, export again: the same file
    page.click(".roi-clear")
    assert boxes_on_canvas(page) == 0
    page.fill("#roi-prompt textarea", "")
    assert json.loads(exported(page)) == {"width": 32, "height": 32, "instances": []}
    layout_file = tmp_path / "layout.json"
    layout_file.write_text(text, encoding="utf-8")
    with page.expect_file_chooser() as chooser:
        page.click("#roi-import")
    chooser.value.set_files(str(layout_file))
    page.wait_for_function("document.querySelectorAll('.roi-canvas .roi-box').length === 2", timeout=30_000)
    assert page.input_value("#roi-prompt textarea") == uh.PROMPT
    assert page.input_value('.roi-caption[data-index="0"]') == uh.INSTANCES[0]["caption"]
    assert exported(page) == text

    assert page.errors == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
