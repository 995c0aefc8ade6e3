"""One batch worker: the suite loaded once, jobs run one after another, each result written whole by rename.

1. ``device_plan`` resolves the device (``auto``: CUDA when there is one) and chooses the dtype and the number
   of readers per batched backward pass for it (the attribution batches readers, not prompts).
2. ``BatchWorker`` loads the suite on that device once (and the held-out token set of a dashboard job once per
   size), then ``execute(job)`` runs a job and writes ``OUT/results/<id>.json`` atomically. A job that raises is
   a recorded failure (its error in the result), never the end of the run.
3. A result file holds no timings or host names, so the same job on the same device gives the same bytes:
   that is what lets the tests compare a killed-and-resumed run with an uninterrupted one file by file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS = "results"
CPU_BATCH_SIZE = 64  # readers per backward pass; the default of `circuits trace` (the benchmark uses 256)
CUDA_BATCH_SIZE = 512  # the edge step of 256 readers takes 33 MB at GPT-2-small shapes (README), so 512 is small for any GPU


@dataclass(frozen=True)
class RunConfig:
    """What every worker of a run needs; JSON-serialisable so it travels to Ray actors and into the manifest."""

    model: str = "mini"
    suite_dir: str | None = None
    dictionaries: str | None = None  # a --dictionaries spec (saes.suite.parse_dictionaries); None: all of them
    device: str = "auto"
    threshold: float = 0.01
    faithfulness: bool = False
    n_tokens: int = 50_000
    batch_size: int | None = None  # None: chosen for the device by device_plan
    threads: int = 1
    save_graph: bool = False

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"--threshold must be >= 0, got {self.threshold}")
        if self.dictionaries is not None:
            from saes.suite import parse_dictionaries

            try:
                parse_dictionaries(self.dictionaries, None)
            except ValueError as e:
                raise ValueError(f"--dictionaries: {e}") from None
        if self.n_tokens <= 0:
            raise ValueError(f"--n-tokens must be positive, got {self.n_tokens}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.threads <= 0:
            raise ValueError(f"--threads must be positive, got {self.threads}")

    def job_defaults(self) -> dict[str, Any]:
        return dict(threshold=self.threshold, faithfulness=self.faithfulness, n_tokens=self.n_tokens)


@dataclass(frozen=True)
class DevicePlan:
    """What a worker runs on, said in the manifest and the final table."""

    device: str
    dtype: str
    batch_size: int
    name: str
    memory_gb: float | None
    why: str


def device_plan(requested: str, batch_size: int | None = None) -> DevicePlan:
    """Resolve ``requested`` (auto, cpu, cuda, cuda:N) and choose dtype and batch size for it.

    The dtype is the suite's own float32 on every device: each circuit checks its completeness identities and
    raises above the float32 tolerance, which bfloat16 would not meet; on a GPU the speed comes from batching
    readers (CUDA_BATCH_SIZE per backward pass) rather than from a narrower dtype."""
    import torch

    from scripts.common import resolve_device

    device = resolve_device(requested)
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return DevicePlan(device, "float32", batch_size or CUDA_BATCH_SIZE, props.name, round(props.total_memory / 2**30, 1),
                          "float32 keeps every circuit's completeness check within tolerance; readers batched "
                          f"{batch_size or CUDA_BATCH_SIZE} per backward pass on the GPU")
    return DevicePlan(device, "float32", batch_size or CPU_BATCH_SIZE, platform.processor() or platform.machine(), None,
                      f"CPU ({torch.get_num_threads()} torch threads); float32, {batch_size or CPU_BATCH_SIZE} readers per backward pass")


def result_path(out_dir: Path, job_id: str) -> Path:
    return Path(out_dir) / RESULTS / f"{job_id}.json"


def read_result(path: Path) -> dict[str, Any] | None:
    """A result file, or None where it is missing or unreadable (treated as not done)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def remove_stale_temps(out_dir: Path, job_ids: list[str]) -> int:
    """Remove temp files left by a killed write of one of *these* jobs (other shards' jobs are not touched: their
    writer may be alive). ``saes.io._atomic_target`` names them ``.<name>.<random>.tmp``."""
    folder = Path(out_dir) / RESULTS
    if not folder.is_dir():
        return 0
    mine = {f".{j}.json." for j in job_ids}
    n = 0
    for p in folder.iterdir():
        name = p.name
        if name.startswith(".") and name.endswith(".tmp") and name[: name.rindex(".json.") + 6] in mine:
            p.unlink(missing_ok=True)
            n += 1
    return n


def _error_text(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {msg}"


class BatchWorker:
    """Holds the suite; runs jobs. One per process (local backend) or per Ray actor."""

    def __init__(self, config: RunConfig):
        import torch

        from saes.suite import load_suite

        torch.set_num_threads(config.threads)
        self.config = config
        self.plan = device_plan(config.device, config.batch_size)
        t0 = time.perf_counter()
        self.suite = load_suite(config.model, device=self.plan.device,
                                path=Path(config.suite_dir) if config.suite_dir else None, dictionaries=config.dictionaries)
        self.load_seconds = time.perf_counter() - t0
        self._token_sets: dict[int, Any] = {}
        log.info("worker %d: %s on %s (%s), loaded in %.1f s", os.getpid(), config.model, self.plan.device, self.plan.name, self.load_seconds)

    def _token_set(self, n_tokens: int):
        if n_tokens not in self._token_sets:
            from analysis.scorecard import heldout_token_set

            self._token_sets[n_tokens] = heldout_token_set(self.suite.model, n_tokens)
        return self._token_sets[n_tokens]

    def _trace(self, job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        from circuits.trace import trace

        result = trace(self.suite, job["prompt"], job["target"], threshold=job["threshold"], batch_size=self.plan.batch_size,
                       faithfulness=job["faithfulness"], progress=False, prune=tuple(job["prune"]) if job["prune"] else None)
        c = result.circuit
        out: dict[str, Any] = {}
        if self.config.save_graph:
            from circuits.graph import write_node_link

            write_node_link(c, Path(out_dir) / "graphs" / f"{job['id']}.json")  # the shown view, written atomically
            out["graph"] = f"graphs/{job['id']}.json"
        view = c.shown_view()
        direct = {view.ids[int(s)]: float(w) for s, w in zip(view.edge_src[view.edge_dst == 0], view.edge_weight[view.edge_dst == 0])}
        nodes = [dict(id=n.id, kind=n.kind, layer=n.layer, pos=n.pos, feature=n.feature, token=n.token, activation=n.activation,
                      attribution=n.attribution, influence=n.influence, direct=direct.get(n.id, 0.0))
                 for n in view.nodes() if n.kind != "target"]
        out["circuit"] = dict(
            model=c.model, prompt=c.prompt, tokens=c.tokens, target=c.target, target_value=c.target_value,
            threshold=c.threshold, pruning=c.pruning, max_relative_residual=c.max_relative_residual, scores=c.scores,
            faithfulness=c.faithfulness, qk=c.qk, node_counts=view.counts(), edge_counts=view.edge_counts(), n_edges=view.n_edges,
            nodes=nodes,
        )
        return out

    def _dashboard(self, job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        from analysis.dashboards import write_feature_dashboards
        from saes.io import read_json

        folder = Path(out_dir) / "dashboards" / job["id"]
        pages = write_feature_dashboards(self.suite, {job["dictionary"]: job["features"]}, folder,
                                         tokens=self._token_set(job["n_tokens"]))
        entries = []
        for (name, feature), rel in pages.items():
            card = read_json(folder / rel.replace(".html", ".scorecard.json"))
            entries.append(dict(dictionary=name, feature=feature, page=f"dashboards/{job['id']}/{rel}", scorecard=card))
        return {"dashboards": entries}

    def run(self, job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """The result of one (effective, keyed) job; a failure is a result too."""
        head = dict(id=job["id"], kind=job["kind"], key=job["key"], model=self.config.model, device=self.plan.device,
                    dtype=self.plan.dtype, job={k: v for k, v in job.items() if k != "key"})
        try:
            body = self._trace(job, out_dir) if job["kind"] == "trace" else self._dashboard(job, out_dir)
            return {**head, "status": "ok", **body}
        except Exception as e:  # one job's failure is recorded, never the end of the run
            log.info("job %s failed: %s", job["id"], e)
            if self.plan.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            return {**head, "status": "failed", "error": _error_text(e)}

    def execute(self, job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Run a job, write its result by rename, and return a short record for the progress bar."""
        from saes.io import atomic_write_json

        t0 = time.perf_counter()
        result = self.run(job, out_dir)
        atomic_write_json(result_path(out_dir, job["id"]), result)
        return dict(id=job["id"], status=result["status"], error=result.get("error"), seconds=time.perf_counter() - t0,
                    pid=os.getpid(), peak_memory_mb=self.peak_memory_mb())

    def peak_memory_mb(self) -> float:
        """Peak GPU memory allocated by torch on a GPU; peak resident memory of the process on a CPU."""
        if self.plan.device.startswith("cuda"):
            import torch

            return round(torch.cuda.max_memory_allocated(self.plan.device) / 2**20, 1)
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.plan), "load_seconds": round(self.load_seconds, 2)}
