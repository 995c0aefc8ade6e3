"""``--backend ray``: the same jobs on Ray worker actors, with the same output layout and resume behaviour.

1. Connect to a cluster (``address``, e.g. ``ray://head:10001`` or ``auto``) or start a local Ray instance.
2. Start one actor per GPU of the cluster (``num_gpus=1`` each; Ray sets its ``CUDA_VISIBLE_DEVICES``), or, with
   no GPU, one per CPU slot (``workers`` overrides). Each actor is a ``BatchWorker``: it loads the suite once.
3. Dispatch the pending jobs, two in flight per actor; each actor writes its results into ``OUT/results`` by
   rename, exactly as the local backend does, so ``OUT`` must be on a filesystem every node sees. The driver
   only counts. An actor that dies loses its in-flight jobs (nothing is written for them): the next run does them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from scripts.batch.worker import BatchWorker, RunConfig

log = logging.getLogger(__name__)
INSTALL_HINT = ("--backend ray needs Ray, an optional extra: pip install 'circuits-toolkit[distributed]' "
                "(from a checkout: pip install -e '.[distributed]'), or pip install 'ray[default]>=2.9'")
IN_FLIGHT_PER_ACTOR = 2


def require_ray():
    try:
        import ray
    except ImportError:
        raise ModuleNotFoundError(INSTALL_HINT) from None
    return ray


class RayWorker:
    """The actor: a ``BatchWorker`` behind two remote methods."""

    def __init__(self, config: dict[str, Any]):
        self.worker = BatchWorker(RunConfig(**config))

    def describe(self) -> dict[str, Any]:
        return self.worker.describe()

    def execute(self, job: dict[str, Any], out_dir: str) -> dict[str, Any]:
        return self.worker.execute(job, Path(out_dir))


def run_on_ray(pending: list[dict[str, Any]], config: RunConfig, out_dir: Path, on_start: Callable[[dict], None],
               on_done: Callable[[dict], None], address: str | None = None, workers: int | None = None) -> None:
    from dataclasses import asdict

    ray = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a batch run
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        slots = gpus or int(resources.get("CPU", 1))
        n = min(workers or slots, len(pending))
        if config.device.startswith("cuda") and not gpus:
            raise ValueError(f"--device {config.device}: the Ray cluster has no GPU; use --device auto or cpu")
        actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(RayWorker)
        actors = [actor_cls.remote(asdict(config)) for _ in range(n)]
        descriptions = ray.get([a.describe.remote() for a in actors])
        devices = sorted({d["device"] for d in descriptions})
        on_start({**descriptions[0], "workers": n, "backend": "ray", "devices": devices,
                  "cluster": {k: resources[k] for k in ("CPU", "GPU") if k in resources}})
        queue = list(reversed(pending))
        in_flight: dict[Any, tuple[Any, dict[str, Any]]] = {}

        def submit(actor) -> None:
            if queue:
                job = queue.pop()
                in_flight[actor.execute.remote(job, str(out_dir))] = (actor, job)

        for a in actors:
            for _ in range(IN_FLIGHT_PER_ACTOR):
                submit(a)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, job = in_flight.pop(ready[0])
            try:
                on_done(ray.get(ready[0]))
                submit(actor)
            except ray.exceptions.RayActorError as e:  # the worker died: its jobs stay pending for the next run
                log.warning("a Ray worker died running %s: %s", job["id"], e)
                on_done(dict(id=job["id"], status="lost", error=str(e)))
        for a in actors:
            ray.kill(a)
    finally:
        if started_here:
            ray.shutdown()
