"""Writes legacy_adapter/ and legacy_adapter_output.safetensors: a tiny adapter saved by roi-ops *before* the
grid_policy / guidance_pool options existed (its config.json has neither key), and its UNet output, both made by
that code (commit 6c7b060). tests/adapter/test_adapter_cost.py checks that today's code loads it as
grid_policy="fixed", guidance_pool=1 and computes that output bitwise.

    git archive 6c7b060 roi_ops tests/adapter/roictrl_testutils.py | tar -x -C /tmp/old
    cp roi_ops/_C*.so roi_ops/_build_info.py /tmp/old/roi_ops/
    cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/old/tests/adapter OMP_NUM_THREADS=1 \\
        python <repo>/tests/adapter/data/make_legacy_adapter.py <repo>/tests/adapter/data
"""

import os
import sys

import torch
from roictrl_testutils import make_adapter, make_instances, make_unet, unet_inputs
from safetensors.torch import save_file

import roi_ops

out_dir = sys.argv[1]
assert "grid_policy" not in roi_ops.roictrl_adapter.ArchitectureOptions.names(), "run this with the old code"
torch.set_num_threads(1)
unet = make_unet("sd15")
adapter = make_adapter(unet, "sd15")
adapter.save_pretrained(os.path.join(out_dir, "legacy_adapter"))
sample, t, text, extra = unet_inputs("sd15")
data = make_instances(2, 3, 32, masks=[[1, 1, 1], [0, 0, 0]])
adapter.install(unet)
with torch.no_grad():
    out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
save_file({"output": out.contiguous()}, os.path.join(out_dir, "legacy_adapter_output.safetensors"))
print("wrote", out_dir)
