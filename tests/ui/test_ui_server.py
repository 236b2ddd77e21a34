"""``roi-ops ui`` as a user starts it, on the toy model, called through gradio_client (the held-out check's path):
the /generate endpoint's image has both asked colours in their boxes, and a bad layout is a message."""

import json
import urllib.request

import pytest
from gradio_client import Client

import ui_helpers as uh

STEPS = 20


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with uh.serve(tmp_path_factory.mktemp("ui") / "server.log") as url:
        yield url


def test_page_is_served_on_localhost(url):
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=30) as r:
        assert "roi-ops ui" in r.read().decode()


def test_generate_endpoint_puts_both_colours_in_their_boxes(url):
    client = Client(url, verbose=False)
    layout = json.dumps({"prompt": uh.PROMPT, "instances": uh.INSTANCES})
    for seed in (0, 1):
        path = client.predict(uh.PROMPT, layout, seed, STEPS, api_name="/generate")
        results = uh.colours_in_boxes(path, uh.INSTANCES)
        assert all(r["color_ok"] for r in results), (seed, results)


def test_generate_endpoint_reports_a_bad_layout(url):
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False)
    with pytest.raises(AppError, match=r"layout: instances\[0\]\.box must be 4 numbers, got \[1, 2\]"):
        client.predict("", '{"prompt": "p", "instances": [{"box": [1, 2], "caption": "a"}]}', 0, 5,
                       api_name="/generate")
    with pytest.raises(AppError, match=r"seed must be an integer in \[0, "):
        client.predict(uh.PROMPT, json.dumps({"instances": uh.INSTANCES}), -1, 5, api_name="/generate")
