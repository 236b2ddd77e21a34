"""The one place roi-ops' version is written: ``roi_ops.__version__`` and the
package metadata (pyproject.toml reads it as ``dynamic = ["version"]``)."""
__version__ = "0.1.0"
