"""Job files: JSONL, one job per line, validated strictly; the job key that ties a result to its job; shards.

A trace job explains one scalar of one prompt (the fields of ``circuits trace``)::

    {"id": "s000012-p7", "kind": "trace", "prompt": "import os\\n", "target": "mlp3:211@2",
     "threshold": 0.01, "faithfulness": false, "prune": [0.8, 0.98], "meta": {"source": "os.py"}}

A dashboard job writes the dashboards of some features of one dictionary::

    {"id": "dash-mlp0-0000", "kind": "dashboard", "dictionary": "mlp0", "features": [0, 1, 2], "n_tokens": 50000}

Only ``id``, ``kind`` and (``prompt`` | ``dictionary`` + ``features``) are required; the options default to the
``circuits batch run`` flags. ``meta`` is free-form and copied to the result.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

KINDS = ("trace", "dashboard")
COMMON_FIELDS = {"id", "kind", "meta"}
KIND_FIELDS = {
    "trace": {"prompt", "target", "threshold", "faithfulness", "prune"},
    "dashboard": {"dictionary", "features", "n_tokens"},
}
REQUIRED = {"trace": ("prompt",), "dashboard": ("dictionary", "features")}
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
EXAMPLE = '{"id": "job-0001", "kind": "trace", "prompt": "import os\\n"}'


class JobFileError(ValueError):
    """A job file that cannot be run as written; the message names the file, the line and the fix."""


def _check_job(job: Any, where: str) -> dict[str, Any]:
    if not isinstance(job, dict):
        raise JobFileError(f"{where}: a job must be a JSON object such as {EXAMPLE}, found {type(job).__name__}")
    if "id" not in job:
        raise JobFileError(f"{where}: the job has no \"id\"; give every job a unique id such as \"job-0001\"")
    jid = job["id"]
    if not isinstance(jid, str) or not ID_PATTERN.match(jid):
        raise JobFileError(f"{where}: id {jid!r} is not usable as a file name; use 1-200 letters, digits, '.', '_' or '-', "
                           "not starting with '.' or '-'")
    kind = job.get("kind")
    if kind not in KINDS:
        raise JobFileError(f"{where}: job {jid!r} has unknown kind {kind!r}; use one of {', '.join(map(repr, KINDS))}")
    allowed = COMMON_FIELDS | KIND_FIELDS[kind]
    unknown = sorted(set(job) - allowed)
    if unknown:
        raise JobFileError(f"{where}: job {jid!r} has unknown field {unknown[0]!r}; a {kind} job may have: {', '.join(sorted(allowed))}")
    for name in REQUIRED[kind]:
        if name not in job:
            raise JobFileError(f"{where}: {kind} job {jid!r} needs {name!r}")

    def bad(name: str, want: str) -> JobFileError:
        return JobFileError(f"{where}: job {jid!r}: {name!r} must be {want}, got {job[name]!r}")

    if kind == "trace":
        if not isinstance(job["prompt"], str) or not job["prompt"].strip():
            raise bad("prompt", "a non-empty string")
        if "target" in job and job["target"] is not None and not isinstance(job["target"], str):
            raise bad("target", 'a target spec string such as "mlp3:211@5", or null for the default target')
        if "threshold" in job and (isinstance(job["threshold"], bool) or not isinstance(job["threshold"], (int, float)) or job["threshold"] < 0):
            raise bad("threshold", "a number >= 0")
        if "faithfulness" in job and not isinstance(job["faithfulness"], bool):
            raise bad("faithfulness", "true or false")
        if "prune" in job and job["prune"] is not None:
            p = job["prune"]
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in p)):
                raise bad("prune", "null or two numbers in (0, 1], e.g. [0.8, 0.98]")
    else:
        if not isinstance(job["dictionary"], str) or not job["dictionary"]:
            raise bad("dictionary", 'a dictionary name such as "mlp0"')
        f = job["features"]
        if not (isinstance(f, list) and f and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in f)):
            raise bad("features", "a non-empty list of feature indices (integers >= 0)")
        if "n_tokens" in job and (isinstance(job["n_tokens"], bool) or not isinstance(job["n_tokens"], int) or job["n_tokens"] <= 0):
            raise bad("n_tokens", "a positive integer")
    if "meta" in job and not isinstance(job["meta"], dict):
        raise bad("meta", "a JSON object")
    return job


def read_jobs(path: Path) -> list[dict[str, Any]]:
    """Every job of a JSONL job file, in file order; refuses the whole file at its first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} not found; write one (one JSON object per line, e.g. {EXAMPLE}) "
                                "or generate it with `circuits batch make-jobs`")
    jobs: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise JobFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object, "
                                   f"e.g. {EXAMPLE}") from None
            job = _check_job(obj, where)
            if job["id"] in seen:
                raise JobFileError(f"{where}: duplicate id {job['id']!r} (first on line {seen[job['id']]}); ids must be unique")
            seen[job["id"]] = lineno
            jobs.append(job)
    if not jobs:
        raise JobFileError(f"{path} holds no jobs; write one JSON object per line, e.g. {EXAMPLE}")
    return jobs


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> None:
    from saes.io import atomic_write_text

    for i, job in enumerate(jobs):
        _check_job(job, f"job {i}")
    atomic_write_text(Path(path), "".join(json.dumps(j, sort_keys=True) + "\n" for j in jobs))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def effective_job(job: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The job with every option the result depends on filled in from the run's defaults."""
    out = dict(job)
    if job["kind"] == "trace":
        out.setdefault("target", None)
        out.setdefault("threshold", defaults["threshold"])
        out.setdefault("faithfulness", defaults["faithfulness"])
        out.setdefault("prune", None)
    else:
        out.setdefault("n_tokens", defaults["n_tokens"])
    return out


def job_key(job: dict[str, Any], model: str) -> str:
    """What a result must match to count as this job's: the effective job and the model. Device, dtype policy and
    batch size are left out on purpose, so a run begun on one machine can be finished on another."""
    return hashlib.sha256(canonical({"job": job, "model": model}).encode()).hexdigest()[:16]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N; K is 0-based like ``SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard {text!r}: write it as K/N with 0 <= K < N, e.g. --shard 0/4 (K is 0-based, "
                         "like $SLURM_ARRAY_TASK_ID with --array=0-3)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"--shard {text}: the number of shards N must be at least 1")
    if not 0 <= k < n:
        raise ValueError(f"--shard {text}: shard index {k} is out of range for {n} shards; K must be 0..{n - 1} "
                         f"(0-based, like $SLURM_ARRAY_TASK_ID with --array=0-{n - 1})")
    return k, n


def shard_jobs(jobs: list[dict[str, Any]], k: int, n: int) -> list[dict[str, Any]]:
    """Round-robin by position in the job file: shard k takes jobs k, k+n, k+2n, ...; the shards partition the
    file and differ in size by at most one job."""
    return jobs[k::n]


def shard_tag(k: int, n: int) -> str:
    return "all" if n == 1 else f"shard-{k}-of-{n}"
