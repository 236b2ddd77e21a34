"""roi_ops.ui.app's handlers, the engine and the subcommand, in-process on the committed toy model."""

import json
import threading

import gradio as gr
import pytest
import torch

import ui_helpers as uh
from roi_ops.cli import build_parser, main
from roi_ops.ui import app as ui_app
from roi_ops.ui import command, engine as ui_engine, layouts

CANVAS = {"width": 32, "height": 32, "instances": uh.INSTANCES}
STEPS = 10  # enough for the toy model to draw both objects (30 is the default)


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32 x 32 model: more threads only wait on each other on a shared machine
    yield ui_engine.Engine.load(str(uh.MODEL), str(uh.ADAPTER))
    torch.set_num_threads(threads)


class NoModel:
    """An engine whose model must not run: the checks come first."""

    height = width = 32
    vae_factor = 8

    def generate(self, *args, **kwargs):
        raise AssertionError("the model ran on a request that should have been refused")


def test_generate_page_puts_both_colours_in_their_boxes(engine):
    steps_seen = []
    image, overlay, maps, status = ui_app.generate_page(
        engine, uh.PROMPT, "", CANVAS, 0, STEPS, 7.5, 1.0, 1.0, lambda p, **kw: steps_seen.append(p))
    assert image.size == (32, 32)
    assert all(r["color_ok"] for r in uh.colours_in_boxes(image, uh.INSTANCES))
    # the image is the pipeline's for the same arguments (the page adds nothing of its own)
    ref = engine.roictrl(uh.PROMPT, instances=[uh.INSTANCES], num_inference_steps=STEPS, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(0)).images[0]
    assert image.tobytes() == ref.tobytes()
    # progress: waiting, then every step
    assert steps_seen == [0] + [(k, STEPS) for k in range(1, STEPS + 1)]
    # display pictures: overlay scaled up by a whole factor, one blend map per instance + the global share
    factor = ui_engine.display_factor(32, 32)
    assert factor == 12 and overlay.size == (32 * factor, 32 * factor)
    assert [label.split(" (max")[0] for _, label in maps] == ["0: a red square", "1: a blue circle",
                                                               "global (1 - sum)"]
    red_map = torch.frombuffer(bytearray(maps[0][0].convert("L").tobytes()), dtype=torch.uint8).float().view(384, 384)
    # instance 0's weight is in its box (x 0.08-0.45, y 0.1-0.45) and nowhere near instance 1's
    assert red_map[60:160, 50:160].mean() > 4 * red_map[220:330, 230:340].mean() + 1
    assert status.startswith("Generated a 32 x 32 image with 2 instance(s)")


@pytest.mark.parametrize("canvas, seed, message", [
    ({**CANVAS, "instances": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": ""}]}, 0,
     "instances[0].caption must be a non-empty string"),
    ({**CANVAS, "instances": [{"box": [0.5, 0.5, 1.4, 0.9], "caption": "a"}]}, 0, "instances[0][0]"),
    (CANVAS, -3, "seed must be an integer in [0, 9007199254740991]"),
    ("<script>", 0, "the canvas must hold"),
])
def test_generate_page_shows_validation_errors_as_messages(canvas, seed, message):
    with pytest.raises(gr.Error) as err:
        ui_app.generate_page(NoModel(), uh.PROMPT, "", canvas, seed, STEPS, 7.5, 1.0, 1.0)
    assert message in err.value.message and "Traceback" not in err.value.message
    assert err.value.print_exception is False


def test_an_unexpected_failure_is_one_message_and_a_logged_trace(caplog):
    class Broken(NoModel):
        def generate(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    with pytest.raises(gr.Error, match=r"generation failed \(RuntimeError\): out of memory"):
        ui_app.generate_page(Broken(), uh.PROMPT, "", CANVAS, 0, STEPS, 7.5, 1.0, 1.0)
    assert "Traceback" in caplog.text  # on the server's log, not in the page


def test_generate_api_reads_the_layout_json(engine):
    layout = json.dumps({"prompt": "ignored", "instances": uh.INSTANCES})
    image = ui_app.generate_api(engine, uh.PROMPT, layout, 0, STEPS)
    ref = engine.roictrl(uh.PROMPT, instances=[uh.INSTANCES], num_inference_steps=STEPS,
                         guidance_scale=layouts.DEFAULT_GUIDANCE_SCALE,
                         generator=torch.Generator().manual_seed(0)).images[0]
    assert image.tobytes() == ref.tobytes()
    for bad, message in [("{", "layout is not valid JSON"), ({"prompt": "a"}, "layout must be the layout file's"),
                         ('{"prompt": "a", "instances": [{"box": [0, 0, 1], "caption": "x"}]}',
                          "layout: instances[0].box must be 4 numbers")]:
        with pytest.raises(gr.Error) as err:
            ui_app.generate_api(NoModel(), "", bad, 0, STEPS)
        assert message in err.value.message


def test_export_writes_the_file_import_reads_back(tmp_path, engine):
    text, path = ui_app.export_layout(uh.PROMPT, "blurry", CANVAS, str(tmp_path))
    assert open(path, encoding="utf-8").read() == text
    assert json.loads(text) == {"prompt": uh.PROMPT, "negative_prompt": "blurry", "width": 32, "height": 32,
                                "instances": uh.INSTANCES}
    # import takes the file's bytes (never a path) and gives the page's fields back
    assert ui_app.import_layout(engine, text.encode()) == (uh.PROMPT, "blurry", CANVAS, text)
    with pytest.raises(gr.Error, match="is not valid JSON"):
        ui_app.import_layout(engine, path.encode())  # a path string is content, and not a layout
    with pytest.raises(gr.Error, match="caption must be a non-empty string"):
        ui_app.export_layout("", "", {**CANVAS, "instances": [{"box": [0, 0, 1, 1], "caption": ""}]}, str(tmp_path))


def test_engine_runs_one_request_at_a_time(engine):
    """Two threads at once: the second waits for the lock (the pipeline alone would refuse it)."""
    request = layouts.make_request(layouts.validate_layout({"prompt": uh.PROMPT, "instances": uh.INSTANCES}),
                                   seed=0, steps=3, height=32, width=32, vae_factor=8)
    results, errors = [], []

    def run():
        try:
            results.append(engine.generate(request).image)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2
    assert results[0].tobytes() == results[1].tobytes()


def test_the_app_queues_model_events_and_serves_one_api_endpoint(engine):
    app = ui_app.build_app(engine)
    info = app.get_api_info()
    assert list(info["named_endpoints"]) == ["/generate"]
    params = info["named_endpoints"]["/generate"]["parameters"]
    assert [(p["parameter_name"], p["python_type"]["type"]) for p in params] == [
        ("prompt", "str"), ("layout", "str"), ("seed", "int"), ("steps", "int")]
    model_fns = [fn for fn in app.fns.values() if fn.concurrency_id == ui_app.MODEL_QUEUE]
    assert len(model_fns) == 2 and all(fn.concurrency_limit == 1 for fn in model_fns)
    assert app._queue.max_size == ui_app.MAX_QUEUE


def test_ui_command_checks_arguments_before_loading(tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(ui_engine.Engine, "load", classmethod(lambda cls, *a: loads.append(a)))
    args = build_parser().parse_args(["ui", "--model", "m", "--adapter", "a"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)  # this machine only, by default
    assert main(["ui", "--model", str(tmp_path / "none"), "--adapter", str(uh.ADAPTER)]) == 2
    assert "roi-ops ui: error: --model" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    assert main(["ui", "--model", str(uh.MODEL), "--adapter", str(tmp_path / "bad")]) == 2
    assert "roi-ops ui: error: --adapter" in capsys.readouterr().err
    assert loads == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui", "--model", "m", "--adapter", "a", "--port", "70000"])
    assert "--port: must be an integer in [1, 65535], got 70000" in capsys.readouterr().err


def test_ui_command_loads_the_model_once_and_binds_localhost(engine, monkeypatch, capsys):
    loads, launches = [], []
    monkeypatch.setattr(ui_engine.Engine, "load", classmethod(lambda cls, *a: loads.append(a) or engine))
    monkeypatch.setattr(ui_app, "launch", lambda app, host, port: launches.append((host, port)))
    assert main(["ui", "--model", str(uh.MODEL), "--adapter", str(uh.ADAPTER), "--port", "7999"]) == 0
    assert len(loads) == 1 and launches == [("127.0.0.1", 7999)]
    assert "warning" not in capsys.readouterr().err
    assert main(["ui", "--model", str(uh.MODEL), "--adapter", str(uh.ADAPTER), "--host", "0.0.0.0"]) == 0
    assert "--host 0.0.0.0 serves the page beyond this machine" in capsys.readouterr().err
    assert command._is_loopback("::1") and command._is_loopback("localhost") and not command._is_loopback("10.0.0.1")
