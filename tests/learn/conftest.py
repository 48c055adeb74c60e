import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from gblr.learn.synthetic import recovery_run


@pytest.fixture(scope="session")
def recovery_runs():
    """``recovery_runs(seeds, **options)``: :func:`recovery_run` of each seed, in order,
    computed in two processes of one torch thread each.

    The recovery benchmark's figures (``bench_learner.py``) were measured with one thread
    per run, and a 64 x 64 run gains nothing from a second thread, so two processes halve
    the wall time of the multi-seed tests on CI's two cores. ``spawn``: a forked copy of
    a process whose thread pools are running can deadlock.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=2, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:

        def runs(seeds, **options):
            return list(pool.map(functools.partial(recovery_run, **options), seeds))

        yield runs
