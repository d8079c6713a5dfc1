"""Executors, batched grids and checkpoints: wall time, end to end.

1. A 12-run grid (3 optimizers x 4 lengths of temporal order, short budgets) through
   the ``serial`` executor (one run after another in this process) and through
   ``local:1``, ``local:2`` and ``dask`` (a ``LocalCluster`` of 2 workers): wall time
   of the whole comparison, compilation included, as the ratio serial / executor:
   first with a cold compilation cache of its own, then again (new results
   directory) with that cache warm, and the cores each used (CPU seconds of the
   process and its workers / wall seconds). Target: >= 1.8x with two workers on
   two cores.
   With ``--warm-only`` the cold pass is skipped: every executor shares one cache
   that a first, unreported pass fills.
2. Parallel efficiency of this machine: one process alone against the same process
   twice at once, for a pure-Python loop that imports nothing (the machine's own
   efficiency), a ``curvbench run`` of a first-order method (SGD-C) and one of a
   Hessian-vector method (AdaHessian), with the cores each uses alone (CPU seconds
   / wall seconds: XLA runs matrix products on one thread, but its runtime runs
   independent operations of a program on a second one). With both parts, the
   script prints the ceiling for two workers: 2 x the loop's efficiency / the
   cores the serial executor used.
3. A batched 4-point learning-rate grid x 5 seeds against the same 4 runs trained
   one by one (both in this process, cold in-process program cache): time ratio.
4. Resume checkpoints: a run's training time with the default interval (300 s),
   with a checkpoint after every chunk (the worst case) and with none. Target:
   <= 3% at the default.
5. Work lost to ``kill -9`` at a random moment of a run that saves every 2 s: the
   age of the last checkpoint when the process died (at most one interval plus the
   chunk in progress).

Every process runs XLA's matrix products on one thread, as the ``curvbench``
command does.

    python benchmarks/bench_executors.py [--quick] [--warm-only] [--parts ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from runner.worker import use_one_thread

ROOT = Path(__file__).resolve().parents[1]

use_one_thread()

import jax  # noqa: E402

from analysis.results import resume_path  # noqa: E402
from runner import run as run_module  # noqa: E402
from runner.compare import compare  # noqa: E402
from runner.config import parse_comparison  # noqa: E402
from runner.executors import ExecutorConfig  # noqa: E402


def grid(steps: int, lengths: list[int], optimizers: list[dict], **extra) -> dict:
    return {
        "name": "bench", "seeds": 2, "steps": steps, "eval_every": 100,
        "eval_size": 200,
        "task": [{"name": "temporal_order", "hidden": 32, "init": "basic_tanh",
                  "grid": {"length": lengths}}],
        "optimizer": optimizers, **extra,
    }  # fmt: skip


def executors(root: Path, steps: int, warm_only: bool = False) -> None:
    data = grid(
        steps,
        [10, 20, 30, 40],
        [
            {"name": "sgd_clip", "learning_rate": 0.1},
            {"name": "sgd_cr", "learning_rate": 0.1},
            {"name": "adahessian", "every": 1},
        ],
    )
    comparison = parse_comparison(data)
    print(f"\n{len(comparison.runs)} runs, {steps} steps, 2 seeds each")
    print(
        "| executor | cold cache (s) | serial / executor | warm cache (s) "
        "| serial / executor | cores used (warm) |"
    )
    print("|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    warm: dict[str, tuple[float, float]] = {}  # wall and CPU seconds, warm cache
    if warm_only:  # one shared cache, filled by a pass that is not reported
        fill = ExecutorConfig("local", workers=2, cache_dir=str(root / "cache"))
        assert not compare(comparison, root / "fill", False, fill).failures
        while multiprocessing.active_children():  # their CPU time counted now
            time.sleep(0.05)
    for name in ("serial", "local:1", "local:2", "dask"):
        spec = ExecutorConfig.parse(name)
        workers = 2 if name == "dask" else spec.workers
        cache = root / ("cache" if warm_only else f"cache-{name}")
        spec = ExecutorConfig(spec.kind, workers=workers, cache_dir=str(cache))
        cells = ["-", "-"] if warm_only else []
        for cache_state in ("warm",) if warm_only else ("cold", "warm"):
            run_module._PROGRAMS.clear()  # serial compiles like a new process
            out = root / f"{name.replace(':', '')}-{cache_state}"
            cpu = cpu_seconds()
            start = time.perf_counter()
            outcome = compare(comparison, out, False, spec)
            seconds = time.perf_counter() - start
            # Idle workers exit after compare returns (a `curvbench compare`
            # prints its table meanwhile); let them go before the next row.
            while multiprocessing.active_children():
                time.sleep(0.05)
            cpu = cpu_seconds() - cpu  # workers' included, once they have exited
            assert not outcome.failures, outcome.failures
            base.setdefault(cache_state, seconds)
            cells += [f"{seconds:.1f}", f"{base[cache_state] / seconds:.2f}x"]
        cells.append(f"{cpu / seconds:.2f}")
        warm.setdefault(name, (seconds, cpu))
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    serial_seconds, serial_cpu = warm["serial"]
    start_cpu = worker_start_cpu()
    ideal = (serial_cpu + 2 * start_cpu) / 2
    print(
        f"\nbound for two workers: the serial executor's {serial_cpu:.1f} CPU "
        f"seconds plus two worker starts of {start_cpu:.1f} each, spread perfectly "
        f"over 2 cores, take {ideal:.1f} s: {serial_seconds / ideal:.2f}x serial"
    )


def worker_start_cpu() -> float:
    """CPU seconds a fresh worker process spends before its first run (start,
    imports, setup), without JAX's teardown at exit, which pools do not wait for."""
    code = (
        "import os, runner.worker as w; "
        "w.setup(w.WorkerSetup(None, True, (), '.')); import runner.batching; "
        "os._exit(0)"
    )
    cpu = cpu_seconds()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return cpu_seconds() - cpu


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its exited children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


#: A fixed CPU-bound workload with no JAX and a tiny working set: the machine's own
#: pair efficiency, whatever the toolkit does.
REFERENCE_LOOP = "s = 0\nfor i in range(25_000_000):\n    s += i * i % 7\n"


#: Rounds of "alone, then two at once" per workload (medians reported).
ROUNDS = 3


def pairs(root: Path, steps: int) -> None:
    """One process alone against two at once, interleaved over :data:`ROUNDS`."""
    print(
        "\none process alone and two at once "
        f"(runs: length 40, 32 units, {steps} steps)"
    )
    print(
        "| workload | alone (s) | cores used alone | two at once (s each, range) "
        "| efficiency |"
    )
    print("|---|---|---|---|---|")
    env = {**os.environ, "CURVBENCH_CACHE": str(root / "pairs-cache")}

    def run_command(name: str, extra: list[str]):
        def command(i: int) -> list[str]:
            return [sys.executable, "-m", "runner.cli", "run", "--task",
                    "temporal_order", "--optimizer", name, *extra, "--seeds", "2",
                    "--steps", str(steps), "-t", "length=40", "-t", "hidden=32",
                    "-t", "init=basic_tanh", "--eval-every", "100",
                    "--eval-size", "200", "--quiet", "--out",
                    str(root / f"pairs-{name}-{i}")]  # fmt: skip

        return command

    workloads = {
        "Python loop, no JAX": lambda i: [sys.executable, "-c", REFERENCE_LOOP],
        "sgd_clip run": run_command("sgd_clip", []),
        "adahessian run": run_command("adahessian", ["-o", "every=1"]),
    }
    for label, command in workloads.items():
        timed(env, command(0))  # warm-up (a run fills the compilation cache)
        alone, cores, both = [], [], []
        for _ in range(ROUNDS):  # alone and together interleaved: the machine drifts
            for path in root.glob("pairs-*-[0-9]"):
                shutil.rmtree(path)
            cpu = cpu_seconds()
            alone += timed(env, command(0))
            cores.append((cpu_seconds() - cpu) / alone[-1])
            both += timed(env, command(1), command(2))
        print(
            f"| {label} | {median(alone):.1f} | {median(cores):.2f} "
            f"| {median(both):.1f} ({min(both):.1f}-{max(both):.1f}) "
            f"| {median(alone) / median(both):.2f} |",
            flush=True,
        )


def timed(env: dict, *commands: list[str]) -> list[float]:
    """Start ``commands`` at once; each one's wall seconds until it exits."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    ends: dict[int, float] = {}
    while len(ends) < len(procs):  # each process's own end time
        for i, proc in enumerate(procs):
            if i not in ends and proc.poll() is not None:
                assert proc.returncode == 0
                ends[i] = time.perf_counter() - start
        time.sleep(0.01)
    return [ends[i] for i in range(len(procs))]


def batched(root: Path, steps: int) -> None:
    data = grid(
        steps,
        [30],
        [{"name": "sgd_clip", "grid": {"learning_rate": [0.03, 0.1, 0.3, 1.0]}}],
        seeds=5,
    )
    comparison = parse_comparison(data)
    times = {}
    for batch in (False, True):
        run_module._PROGRAMS.clear()
        start = time.perf_counter()
        out = root / f"batched-{batch}"
        outcome = compare(comparison, out, False, "serial", batch_grid=batch)
        times[batch] = time.perf_counter() - start
        assert not outcome.failures
    alone, together = times[False], times[True]
    print(f"\n4-point learning-rate grid x 5 seeds, {steps} steps (compiling included)")
    print("| 4 separate runs (s) | one batched program (s) | ratio |")
    print("|---|---|---|")
    print(f"| {alone:.1f} | {together:.1f} | {alone / together:.2f}x |")


def checkpoints(root: Path, steps: int) -> None:
    from runner.run import run

    print(f"\nresume checkpoints, one run of 5 seeds, {steps} steps, eval every 100")
    print("| resume_every_seconds | training seconds | overhead |")
    print("|---|---|---|")
    settings = {"none": None, "300 (default)": 300.0, "0 (every chunk)": 0.0}
    base = None
    for label, every in settings.items():
        best = float("inf")
        for attempt in range(2):
            out = root / f"ckpt-{attempt}-{label.split()[0]}"
            result = run(
                "temporal_order", "sgd_clip", seeds=5, steps=steps, eval_every=100,
                eval_size=200, task_hparams={"length": 30, "hidden": 50},
                resume_every_seconds=every, out=out,
            )  # fmt: skip
            best = min(best, float(result.summary["run_seconds"].iloc[0]))
        base = base or best
        print(f"| {label} | {best:.2f} | {100 * (best / base - 1):+.1f}% |", flush=True)


def killed(root: Path, rounds: int) -> None:
    print("\nkill -9 at a random moment, resume_every_seconds = 2, eval every 100")
    print("| killed after (s) | age of the last checkpoint (s) |")
    print("|---|---|")
    rng = random.Random(0)
    for r in range(rounds):
        out = root / f"killed-{r}"
        cmd = [sys.executable, "-m", "runner.cli", "run", "--task", "temporal_order",
               "--optimizer", "sgd_clip", "--seeds", "5", "--steps", "100000",
               "-t", "length=30", "--eval-every", "100", "--eval-size", "200",
               "--resume-every-seconds", "2", "--out", str(out), "--quiet"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not list(out.glob("*.resume.npz")) and time.monotonic() < deadline:
            time.sleep(0.05)
        wait = rng.uniform(3.0, 10.0)
        time.sleep(wait)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        (checkpoint,) = out.glob("*.resume.npz")
        age = time.time() - checkpoint.stat().st_mtime
        print(f"| {wait:.1f} after the first save | {age:.2f} |", flush=True)
        assert resume_path(checkpoint.with_suffix("").with_suffix(".json")).exists()


PARTS = ("executors", "pairs", "batched", "checkpoints", "killed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    quick, parts = args.quick, set(args.parts)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, one thread")
    root = Path(tempfile.mkdtemp(prefix="curvbench-bench-"))
    try:
        if "executors" in parts:
            executors(root, 300 if quick else 1000, args.warm_only)
        if "pairs" in parts:
            pairs(root, 1000 if quick else 5000)
        if "batched" in parts:
            batched(root, 300 if quick else 2000)
        if "checkpoints" in parts:
            checkpoints(root, 1000 if quick else 3000)
        if "killed" in parts:
            killed(root, 2 if quick else 5)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
