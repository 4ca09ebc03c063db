"""Launches shared across the distributed tests: each configuration runs once per session."""

from __future__ import annotations

import pytest

from launch import Run, launch


@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    """`launched(*worker_args)` -> the finished Run; the same arguments reuse the first launch."""
    runs: dict[tuple[str, ...], Run] = {}

    def run(*worker_args: str) -> Run:
        if worker_args not in runs:
            out = tmp_path_factory.mktemp("launch")
            runs[worker_args] = launch(out, *worker_args)
            print(f"launch {' '.join(worker_args)}: {runs[worker_args].seconds:.1f} s")
        return runs[worker_args]

    return run
