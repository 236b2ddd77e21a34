"""Training a ROICtrl adapter: the data folder format (:mod:`.data`), the architecture defaults read from a model
folder (:mod:`.models`), the one training loop on Hugging Face Accelerate (:mod:`.trainer`) the ``roi-ops
train`` command (:mod:`.train`), and ``roi-ops prepare coco`` (:mod:`.coco`, :mod:`.prepare`). See docs/training.md.

Heavy imports (torch, diffusers, accelerate) happen inside the submodules' functions.
"""

from .data import DatasetError, read_dataset
from .models import ModelError, adapter_defaults, model_geometry

__all__ = ["DatasetError", "ModelError", "adapter_defaults", "model_geometry", "read_dataset"]
