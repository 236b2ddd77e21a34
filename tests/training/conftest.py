"""Shared set-up of the ``roi-ops train`` tests: the committed toy model, small data folders of the synthetic
world, and an in-process CLI runner that returns (exit status, stdout, stderr)."""

import pytest
from training_helpers import write_world


@pytest.fixture(scope="session")
def world_data(tmp_path_factory):
    """12 training layouts of the toy world as a data folder (read-only for the tests)."""
    return write_world(tmp_path_factory.mktemp("world"), 12)


@pytest.fixture
def cli(capsys):
    """Run ``roi-ops`` in-process: returns (status, out, err)."""
    from accelerate.state import AcceleratorState

    from roi_ops.cli import main

    def run(*argv):
        AcceleratorState._reset_state(True)  # one Accelerator per run, as in a fresh process
        capsys.readouterr()
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run
