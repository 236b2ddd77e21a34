"""The instance-control benchmark lives under benchmarks/; make ``instance_control`` importable as a package."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
