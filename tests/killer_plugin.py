"""A plug-in optimizer whose worker process dies (for the executor tests).

Building it in the main process works (the comparison validates it); building it in
a worker process kills that process, as an out-of-memory kill would.
"""

import multiprocessing
import os
import signal

import optax


def dies_in_worker(learning_rate: float = 0.01) -> optax.GradientTransformation:
    if multiprocessing.parent_process() is not None or os.environ.get("DASK_WORKER"):
        os.kill(os.getpid(), signal.SIGKILL)
    return optax.sgd(learning_rate)
