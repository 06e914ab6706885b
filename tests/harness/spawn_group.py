"""Shared harness of the vocabulary-parallel tests: run a worker script as a gloo group of processes.

Each rank runs ``worker rank world init_file cases_file out_dir`` with the Triton interpreter in its
environment (set before the child imports triton when CUDA is absent) and saves its results to
``out_dir/rank{r}.pt``; a rank that fails or outlives the deadline fails the test with its log.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import torch


def run_group(worker: pathlib.Path, world: int, specs: list, tmp: pathlib.Path, timeout_s: float) -> dict:
    """{case id: [result of each rank]} of ``worker`` run on ``specs`` by ``world`` processes."""
    cases_file, init_file = tmp / f"cases{world}.pt", tmp / f"init{world}"
    torch.save(specs, cases_file)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(worker.parent), str(worker.parent.parent),
                                                           os.environ.get("PYTHONPATH", "")]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # must be in the environment before the child imports triton
    env.setdefault("OMP_NUM_THREADS", "1")
    logs = [open(tmp / f"rank{r}.log", "w") for r in range(world)]  # files: a pipe could fill up
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(init_file),
                               str(cases_file), str(tmp)], env=env, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(world)]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # killed below; the assertion shows the ranks' logs
    finally:
        for p in procs:  # only our own children, by handle
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        p.wait()
        logs[r].close()
        log = (tmp / f"rank{r}.log").read_text()[-6000:]
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"
    per_rank = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {cid: [pr[cid] for pr in per_rank] for cid in per_rank[0]}


def cached_spawner(spawn, tmp_path_factory, prefix: str):
    """A per-module getter: one spawn per world size, its result (or its exception) reused."""
    cache: dict = {}

    def get(world: int):
        if world not in cache:
            try:
                cache[world] = spawn(world, tmp_path_factory.mktemp(f"{prefix}{world}"))
            except Exception as e:
                cache[world] = e
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]
    return get


def assert_ranks_ok(res: list) -> None:
    """No rank raised inside the case."""
    for r, out in enumerate(res):
        assert "error" not in out, f"rank {r} raised {out['error']}: {out['message']}\n{out['traceback']}"
