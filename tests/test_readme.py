"""The README's usage example runs as written and does what it says."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["crops"].shape == (2, 320, 25, 25)
    assert scope["pasted"].shape == (2, 320, 64, 64)
    assert scope["feats"].grad is not None and torch.isfinite(scope["feats"].grad).all()
