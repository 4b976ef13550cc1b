"""Dask scale-out of the attribute stage: one task per missing block, the model loaded once per worker.

``--workers N`` starts a local cluster on the loopback interface: one worker process per GPU when there are GPUs
(worker ``i`` sees only GPU ``i`` through ``CUDA_VISIBLE_DEVICES``). ``--scheduler ADDRESS`` uses an existing
cluster, e.g. one started by dask-jobqueue on SLURM or by dask-kubernetes (see the README). Tasks are retried when
a worker dies, so the store ends complete; every task writes its own whole block, so workers never share a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin, as_completed, get_worker
from tqdm.auto import tqdm

from .attribute import AttributionJob, BlockComputer
from .relevance_store import StoreLayout

__all__ = ["ModelPlugin", "local_cluster", "run_on_dask"]

PLUGIN_NAME = "spray-audit-model"
#: chaos testing: a worker computing this block exits abruptly once (marker file: CHAOS_MARKER), to prove that
#: the tasks of a dead worker are rerun and the store still ends complete
CHAOS_BLOCK, CHAOS_MARKER = "SPRAY_AUDIT_CHAOS_KILL_BLOCK", "SPRAY_AUDIT_CHAOS_MARKER"


class ModelPlugin(WorkerPlugin):
    """Loads the model (and the manifest) once per worker, on that worker's GPU if it has one."""

    def __init__(self, job: AttributionJob):
        self.job = job

    def setup(self, worker) -> None:
        device = None
        if self.job.device in ("auto", "cuda") and torch.cuda.is_available():
            # a local cluster pins one GPU per worker (CUDA_VISIBLE_DEVICES); elsewhere spread by worker name
            index = int(worker.name) if str(worker.name).isdigit() else 0
            device = torch.device(f"cuda:{index % torch.cuda.device_count()}")
        worker.data_plugin_computer = BlockComputer(self.job, device=device)


def _compute_block(block: int, layout: StoreLayout) -> int:
    if os.environ.get(CHAOS_BLOCK) == str(block) and not Path(os.environ[CHAOS_MARKER]).exists():
        Path(os.environ[CHAOS_MARKER]).touch()
        os._exit(1)
    computer: BlockComputer = get_worker().data_plugin_computer
    return computer.compute_block(block, layout)


def local_cluster(n_workers: int) -> SpecCluster:
    """Worker processes on 127.0.0.1, one thread each; with GPUs, worker ``i`` sees only GPU ``i mod count``."""
    gpus = torch.cuda.device_count()
    workers = {
        i: {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "env": {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {},
            },
        }
        for i in range(n_workers)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def run_on_dask(
    job: AttributionJob, layout: StoreLayout, blocks: list[int], scheduler: str | None, workers: int, progress: bool
) -> None:
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = local_cluster(workers or max(1, torch.cuda.device_count()))
        client = Client(cluster)
    try:
        client.register_plugin(ModelPlugin(job), name=PLUGIN_NAME)
        futures = client.map(_compute_block, blocks, layout=layout, pure=False, retries=3)
        bar = tqdm(
            total=sum(layout.block_range(b)[1] - layout.block_range(b)[0] for b in blocks),
            desc="attribute (dask)",
            unit="img",
            disable=not progress,
        )
        for future in as_completed(futures):
            bar.update(future.result())
        bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
