"""evaluate.py --merge adds methods to an earlier results.json only when the settings match."""

import json

import pytest

from instance_control import evaluate

SETTINGS = {"per_level": 1, "overlap_per_level": 1, "levels": [2], "overlap_levels": [2], "seeds": [0], "steps": 2,
            "guidance": 3.0, "tracks": ["main"]}


def _record(method, **settings):
    return {"settings": {**SETTINGS, **settings}, "tracks": {"main": {"ground_truth": {}, "methods": {method: {"x": 1}}}},
            "environment": {"torch": "t"}, "seconds": 1.0}


def test_merge_adds_methods_and_keeps_each_runs_environment(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_record("none")))
    merged = evaluate.merge_into(str(path), _record("roictrl"))
    assert list(merged["tracks"]["main"]["methods"]) == ["none", "roictrl"]
    assert [r.get("methods") for r in merged["runs"]] == [None, ["roictrl"]]
    path.write_text(json.dumps(merged))
    again = evaluate.merge_into(str(path), _record("regional"))
    assert len(again["runs"]) == 3 and "environment" not in again
    with pytest.raises(ValueError, match=r"settings of .*differ: \['steps'\]"):
        evaluate.merge_into(str(path), _record("gligen", steps=20))
