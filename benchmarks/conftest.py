"""pytest-benchmark hook: the raw --benchmark-json also records threads, versions and THP settings."""

from bench_ops import environment_info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["roi_ops"] = environment_info()
