"""``circuits batch run``: this shard's jobs, minus those already done, through a backend; manifest and table.

1. Read and validate the whole job file (a bad line stops the run before any work), keep shard K of N.
2. Each job gets its key (the job with the run's defaults filled in, and the model). A job is *done* when
   ``OUT/results/<id>.json`` parses and carries that key: ``ok``, or ``failed`` (redone only with
   ``retry_failed``). A missing, unreadable or stale result (other key) means the job runs. Temp files left by a
   killed write of this shard's jobs are removed.
3. The manifest (``OUT/manifest.json``, or ``OUT/manifest-shard-K-of-N.json``) is written before the first job,
   every 30 s and after the last, atomically: model, options, job-file hash, shard, counts, device, versions, and
   the earlier invocations on the same folder (``history``).
4. The backend (``local``: one worker here; ``ray``: ``ray_backend.run_on_ray``) runs the pending jobs; each
   finished job updates the progress bar (done, failed, rate) and appends one line to ``OUT/logs/<tag>.events.jsonl``
   (timings live there, not in the results).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from scripts.batch.jobs import effective_job, file_sha256, job_key, read_jobs, shard_jobs, shard_tag
from scripts.batch.worker import BatchWorker, RunConfig, read_result, remove_stale_temps, result_path

log = logging.getLogger(__name__)
BACKENDS = ("local", "ray")


@dataclass
class BatchReport:
    """What a run did; also the ``counts`` of the manifest."""

    shard_jobs: int = 0
    already_ok: int = 0
    already_failed: int = 0
    stale: int = 0
    ran: int = 0
    ok: int = 0
    failed: int = 0
    lost: int = 0  # jobs whose worker died (Ray); not written, so the next run does them
    temps_removed: int = 0
    run_seconds: float = 0.0
    peak_memory_mb: float = 0.0  # the largest over workers: GPU memory allocated by torch, or process RSS on a CPU
    failures: list[dict[str, str]] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ran / self.run_seconds if self.run_seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.already_ok + self.already_failed + self.ok + self.failed == self.shard_jobs

    def counts(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("failures", "device")}
        return {**d, "rate_jobs_per_s": round(self.rate, 4), "complete": self.complete}


def manifest_path(out_dir: Path, k: int, n: int) -> Path:
    return Path(out_dir) / ("manifest.json" if n == 1 else f"manifest-{shard_tag(k, n)}.json")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("circuits-toolkit", "torch", "transformer-lens", "sae-lens", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out.update(source_commit())
    return out


def source_commit() -> dict[str, str]:
    """The git commit of the code that ran, and whether the tree had local changes (results carry no code version:
    a resumed run keeps results made by older code, so the manifest records which code ran)."""
    import subprocess

    here = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode != 0:
        return {}
    return {"git_commit": head.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}


def previous_runs(mpath: Path, keep: int = 50) -> list[dict[str, Any]]:
    """The earlier invocations on this folder and shard (a resumed run keeps what the killed ones did)."""
    from saes.io import read_json

    if not mpath.is_file():
        return []
    try:
        old = read_json(mpath)
    except ValueError:
        return []
    entry = {k: old.get(k) for k in ("started", "finished", "status", "jobs_sha256", "backend", "host", "device", "counts")}
    return (old.get("history", []) + [entry])[-keep:]


def plan_jobs(jobs_path: Path, out_dir: Path, config: RunConfig, shard: tuple[int, int], retry_failed: bool,
              report: BatchReport) -> list[dict[str, Any]]:
    """Steps 1 and 2: the keyed jobs of this shard that still have to run."""
    jobs = shard_jobs(read_jobs(jobs_path), *shard)
    report.shard_jobs = len(jobs)
    report.temps_removed = remove_stale_temps(out_dir, [j["id"] for j in jobs])
    pending = []
    for job in jobs:
        job = effective_job(job, config.job_defaults())
        job["key"] = job_key(job, config.model)
        old = read_result(result_path(out_dir, job["id"]))
        if old is not None and old.get("key") == job["key"] and old.get("status") in ("ok", "failed"):
            if old["status"] == "ok":
                report.already_ok += 1
                continue
            if not retry_failed:
                report.already_failed += 1
                report.failures.append(dict(id=job["id"], error=old.get("error", "")))
                continue
        elif old is not None:
            report.stale += 1
        pending.append(job)
    return pending


def run_local(pending: list[dict[str, Any]], config: RunConfig, out_dir: Path, on_start: Callable[[dict], None],
              on_done: Callable[[dict], None]) -> None:
    worker = BatchWorker(config)
    on_start(worker.describe())
    for job in pending:
        on_done(worker.execute(job, out_dir))


class _Progress:
    """tqdm bar (jobs done, failed, rate) plus the events log; the caller can turn the bar off."""

    def __init__(self, report: BatchReport, events: Path, show: bool, checkpoint: Callable[[], None], every_s: float = 30.0):
        from tqdm import tqdm

        self.report, self.checkpoint, self.every_s = report, checkpoint, every_s
        self.last_checkpoint = time.perf_counter()
        self.bar = tqdm(total=report.shard_jobs, initial=report.already_ok + report.already_failed, unit="job",
                        disable=not show, dynamic_ncols=True, file=sys.stderr)
        events.parent.mkdir(parents=True, exist_ok=True)
        self.events = open(events, "a", encoding="utf-8")
        self.t0: float | None = None

    def start(self, device: dict[str, Any]) -> None:
        self.report.device = device
        self.t0 = time.perf_counter()  # the rate excludes model loading

    def done(self, rec: dict[str, Any]) -> None:
        r = self.report
        if rec["status"] == "lost":
            r.lost += 1
        else:
            r.ran += 1
            if rec["status"] == "ok":
                r.ok += 1
            else:
                r.failed += 1
                r.failures.append(dict(id=rec["id"], error=rec.get("error") or ""))
        r.run_seconds = time.perf_counter() - (self.t0 or time.perf_counter())
        r.peak_memory_mb = max(r.peak_memory_mb, rec.get("peak_memory_mb") or 0.0)
        self.events.write(json.dumps(dict(id=rec["id"], status=rec["status"], seconds=round(rec.get("seconds", 0.0), 4),
                                          pid=rec.get("pid"), time=time.time())) + "\n")
        self.events.flush()
        self.bar.update(1)
        self.bar.set_postfix(ok=r.already_ok + r.ok, failed=r.already_failed + r.failed, rate=f"{r.rate:.2f}/s", refresh=False)
        if time.perf_counter() - self.last_checkpoint > self.every_s:  # a killed run's manifest still says how far it got
            self.checkpoint()
            self.last_checkpoint = time.perf_counter()

    def close(self) -> None:
        self.bar.close()
        self.events.close()


def run_batch(jobs_path: Path, out_dir: Path, config: RunConfig, shard: tuple[int, int] = (0, 1), backend: str = "local",
              retry_failed: bool = False, progress: bool = True, ray_address: str | None = None,
              workers: int | None = None) -> BatchReport:
    """Run this shard's pending jobs; returns the report (also in the manifest)."""
    from saes.io import atomic_write_json

    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if workers is not None and workers <= 0:
        raise ValueError(f"--workers must be positive, got {workers}")
    jobs_path, out_dir = Path(jobs_path), Path(out_dir)
    if backend == "ray":
        from scripts.batch.ray_backend import require_ray

        require_ray()  # before any work, with the install hint
    else:
        from scripts.common import resolve_device

        resolve_device(config.device)  # a missing GPU is refused before anything is written
    report = BatchReport()
    pending = plan_jobs(jobs_path, out_dir, config, shard, retry_failed, report)
    k, n = shard
    manifest = dict(
        command="circuits batch run", status="running", jobs_file=str(jobs_path), jobs_sha256=file_sha256(jobs_path),
        shard=dict(k=k, n=n, tag=shard_tag(k, n)), model=config.model, config=asdict(config),
        backend=dict(name=backend, ray_address=ray_address, workers=workers), retry_failed=retry_failed,
        versions=versions(), host=platform.node(), pid=os.getpid(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    mpath = manifest_path(out_dir, k, n)
    manifest["history"] = previous_runs(mpath)

    def write_manifest(status: str) -> None:
        manifest.update(status=status, counts=report.counts(), device=report.device, failures=report.failures[:100],
                        finished=datetime.now(timezone.utc).isoformat(timespec="seconds") if status != "running" else None)
        atomic_write_json(mpath, manifest)

    write_manifest("running")
    bar = _Progress(report, out_dir / "logs" / f"{shard_tag(k, n)}.events.jsonl", progress, lambda: write_manifest("running"))
    try:
        if pending:
            if backend == "local":
                run_local(pending, config, out_dir, bar.start, bar.done)
            else:
                from scripts.batch.ray_backend import run_on_ray

                run_on_ray(pending, config, out_dir, bar.start, bar.done, address=ray_address, workers=workers)
    except BaseException:
        write_manifest("interrupted")
        raise
    finally:
        bar.close()
    write_manifest("complete" if report.complete else "incomplete")
    return report


def format_report(report: BatchReport, out_dir: Path) -> str:
    r = report
    dev = r.device
    lines = [
        f"{'jobs in this shard':<28}{r.shard_jobs:>8}",
        f"{'  done before (ok/failed)':<28}{r.already_ok:>8} / {r.already_failed}",
        f"{'  run now':<28}{r.ran:>8}   ok {r.ok}, failed {r.failed}" + (f", lost {r.lost}" if r.lost else ""),
        f"{'  redone (stale result)':<28}{r.stale:>8}" if r.stale else None,
        f"{'  half-written files removed':<28}{r.temps_removed:>8}" if r.temps_removed else None,
        f"{'rate (excluding load)':<28}{r.rate:>8.2f} jobs/s over {r.run_seconds:.1f} s" if r.ran else None,
        (f"{'device':<28}{dev.get('device')} ({dev.get('name')}), {dev.get('dtype')}, "
         f"{dev.get('batch_size')} readers per backward pass") if dev else None,
        (f"{'peak memory':<28}{r.peak_memory_mb:>8.0f} MB "
         f"({'GPU, allocated by torch' if str(dev.get('device', '')).startswith('cuda') else 'resident, largest worker'})")
        if r.peak_memory_mb else None,
        f"{'backend':<28}ray, {dev['workers']} workers on {', '.join(dev['devices'])}" if dev.get("backend") == "ray" else None,
        f"{'status':<28}{'complete' if r.complete else 'INCOMPLETE: run the same command again'}",
    ]
    out = [s for s in lines if s]
    if r.failures:
        out.append(f"failures ({len(r.failures)}; errors in {out_dir}/results/<id>.json):")
        out += [f"  {f['id']}: {f['error'][:150]}" for f in r.failures[:10]]
        if len(r.failures) > 10:
            out.append(f"  ... and {len(r.failures) - 10} more")
    return "\n".join(out)
