"""``circuits batch``: job files, shards, resume after SIGKILL, failures, summaries, make-jobs; on a tiny saved suite.

The kill tests run the real command in a subprocess and SIGKILL it at seeded random moments (after a random number
of results has appeared, plus a random delay, so kills land mid-job and mid-write), rerun it, and compare every
result file byte for byte with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saes.io import atomic_save_tensors, save_dictionary, save_model
from saes.testing import TINY_TEXT, make_suite
from scripts.batch.jobs import JobFileError, parse_shard, read_jobs, shard_jobs, write_jobs
from scripts.batch.runner import run_batch
from scripts.batch.worker import RunConfig

REPO = Path(__file__).resolve().parents[1]
LINES = [l + "\n" for l in TINY_TEXT.splitlines()[:12] if l.strip()]


def save_tiny_suite(directory: Path) -> Path:
    """A tiny TopK suite in the mini layout, for ``--model mini --suite-dir``: loads in well under a second."""
    from saes import testing

    suite = make_suite(n_layers=2, d_sae=32, seed=7, activation="topk", k=4)
    shutil.copytree(testing._TOKENIZER_DIRS[len(suite.model.tokenizer)], directory / "tokenizer")
    save_model(suite.model, directory)
    state = {k: v for k, v in suite.model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))}
    atomic_save_tensors(state, directory / "model.safetensors")  # the -inf mask buffers are rebuilt on load
    for layer in range(suite.n_layers):
        save_dictionary(suite.attn_saes[layer], directory / "dictionaries" / f"attn{layer}")
        save_dictionary(suite.transcoders[layer], directory / "dictionaries" / f"mlp{layer}")
    return directory


def tiny_jobs(n: int, failing: tuple[int, ...] = ()) -> list[dict]:
    """``n`` distinct cheap trace jobs (runs of consecutive lines); jobs in ``failing`` ask for a feature that
    does not exist, so they fail the same way every time."""
    jobs = []
    for i in range(n):
        start, length = i % len(LINES), 1 + (i // len(LINES)) % 3
        prompt = "".join(LINES[(start + j) % len(LINES)] for j in range(length))
        job = dict(id=f"job-{i:03d}", kind="trace", prompt=prompt)
        if i % 5 == 1:
            job["target"] = "mlp0:3@-1"
        if i in failing:
            job["target"] = "mlp1:999"
        jobs.append(job)
    return jobs


@pytest.fixture(scope="module")
def tiny_suite_dir(tmp_path_factory) -> Path:
    return save_tiny_suite(tmp_path_factory.mktemp("tiny-suite"))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()  # a worker sets its own thread count, as a worker process should
    yield
    torch.set_num_threads(before)


def config_for(suite_dir: Path, **kw) -> RunConfig:
    return RunConfig(**{"model": "mini", "suite_dir": str(suite_dir), "device": "cpu", "threshold": 0.02, **kw})


def result_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "results").iterdir())}


# ---------------------------------------------------------------------------------------------- job files
BAD_FILES = [
    ('{"id": "a", "kind": "trace", "prompt": "x"}\n{"id": "b", "kind": "trace", "prompt": "y"\n', ":2: not valid JSON"),
    ('{"id": "a", "kind": "circuit", "prompt": "x"}\n', "unknown kind 'circuit'"),
    ('{"id": "a", "kind": "trace", "promt": "x"}\n', "unknown field 'promt'"),
    ('{"id": "a", "kind": "trace"}\n', "needs 'prompt'"),
    ('{"kind": "trace", "prompt": "x"}\n', 'no "id"'),
    ('{"id": "../x", "kind": "trace", "prompt": "x"}\n', "not usable as a file name"),
    ('{"id": "a", "kind": "trace", "prompt": "x"}\n{"id": "a", "kind": "trace", "prompt": "y"}\n', "duplicate id 'a' (first on line 1)"),
    ('{"id": "a", "kind": "trace", "prompt": "x", "threshold": -1}\n', "'threshold' must be a number >= 0"),
    ('{"id": "a", "kind": "dashboard", "dictionary": "mlp0", "features": []}\n', "'features' must be a non-empty list"),
    ('[1, 2]\n', "must be a JSON object"),
    ("\n\n", "holds no jobs"),
]


@pytest.mark.parametrize("text,message", BAD_FILES)
def test_bad_job_files_are_refused_naming_the_line_and_the_fix(tmp_path, text, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text(text)
    with pytest.raises(JobFileError) as e:
        read_jobs(path)
    assert message in str(e.value)


def test_cli_errors_name_the_problem(tmp_path, tiny_suite_dir, capsys):
    from scripts.cli import main

    base = ["batch", "run", "--model", "mini", "--suite-dir", str(tiny_suite_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base + [str(tmp_path / "missing.jsonl")]) == 2
    assert "job file" in (err := capsys.readouterr().err) and "not found" in err and "make-jobs" in err
    write_jobs(tmp_path / "j.jsonl", tiny_jobs(2))
    assert main(base + [str(tmp_path / "j.jsonl"), "--shard", "3/2"]) == 2
    assert "shard index 3 is out of range for 2 shards; K must be 0..1" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "j.jsonl"), "--shard", "two"]) == 2
    assert "write it as K/N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + [str(tmp_path / "j.jsonl"), "--device", "cuda"]) == 2
        assert "no CUDA device is available here; use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing runs, nothing is written, before the input is known to be good"


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2)), (None, (0, 1))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "3/2", "0/0", "-1/2", "1", "a/b"])
def test_parse_shard_refuses(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


@pytest.mark.parametrize("n_jobs", [0, 1, 7, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_shards_partition_the_jobs(n_jobs, n):
    jobs = [dict(id=f"j{i}") for i in range(n_jobs)]
    parts = [shard_jobs(jobs, k, n) for k in range(n)]
    ids = [j["id"] for p in parts for j in p]
    assert sorted(ids) == sorted(j["id"] for j in jobs) and len(ids) == len(set(ids)), "no overlap, no gap"
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [shard_jobs(jobs, k, n) for k in range(n)], "deterministic"


# ---------------------------------------------------------------------------------------------- runs
def test_run_resume_failures_and_manifest(tmp_path, tiny_suite_dir, restore_threads):
    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_jobs(jobs_path, tiny_jobs(8, failing=(3,)))
    cfg = config_for(tiny_suite_dir)
    r = run_batch(jobs_path, out, cfg, progress=False)
    assert (r.ran, r.ok, r.failed, r.complete) == (8, 7, 1, True)
    failed = json.loads((out / "results" / "job-003.json").read_text())
    assert failed["status"] == "failed" and "out of range" in failed["error"] and failed["job"]["target"] == "mlp1:999"
    ok = json.loads((out / "results" / "job-001.json").read_text())
    assert ok["status"] == "ok" and ok["circuit"]["target"].startswith("mlp0:3@")
    assert ok["circuit"]["max_relative_residual"] <= 1e-4 and ok["circuit"]["nodes"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["model"] == "mini" and len(man["jobs_sha256"]) == 64
    assert man["shard"] == dict(k=0, n=1, tag="all") and man["device"]["device"] == "cpu" and man["device"]["dtype"] == "float32"
    assert man["counts"]["ok"] == 7 and man["counts"]["failed"] == 1 and "torch" in man["versions"]
    assert man["counts"]["peak_memory_mb"] > 50, "resident memory of a process with torch loaded"
    assert man["failures"][0]["id"] == "job-003"
    before = result_bytes(out)

    r = run_batch(jobs_path, out, cfg, progress=False)  # everything done: nothing runs, failures are not redone
    assert (r.ran, r.already_ok, r.already_failed, r.complete) == (0, 7, 1, True)
    history = json.loads((out / "manifest.json").read_text())["history"]
    assert [h["counts"]["ran"] for h in history] == [8] and history[0]["device"]["device"] == "cpu"
    r = run_batch(jobs_path, out, cfg, retry_failed=True, progress=False)
    assert (r.ran, r.failed) == (1, 1)
    assert result_bytes(out) == before, "a redone job gives the same bytes"

    # a half-written temp file and a corrupt result are cleaned up and redone; a changed option makes a result stale
    (out / "results" / ".job-004.json.abc123.tmp").write_text('{"id": "job-')
    (out / "results" / "job-005.json").write_text('{"id": "job-005", "sta')
    r = run_batch(jobs_path, out, cfg, progress=False)
    assert (r.ran, r.temps_removed) == (1, 1) and result_bytes(out) == before
    r = run_batch(jobs_path, out, config_for(tiny_suite_dir, threshold=0.05), progress=False)
    assert (r.stale, r.ran, r.already_ok) == (8, 8, 0), "another default threshold: every result is stale"


def test_shards_in_one_folder_equal_one_run(tmp_path, tiny_suite_dir, restore_threads):
    jobs_path = tmp_path / "jobs.jsonl"
    write_jobs(jobs_path, tiny_jobs(10, failing=(4,)))
    cfg = config_for(tiny_suite_dir)
    run_batch(jobs_path, tmp_path / "one", cfg, progress=False)
    reports = [run_batch(jobs_path, tmp_path / "sharded", cfg, shard=(k, 3), progress=False) for k in range(3)]
    assert [r.shard_jobs for r in reports] == [4, 3, 3]
    assert result_bytes(tmp_path / "sharded") == result_bytes(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "sharded").glob("manifest*.json")) == [
        f"manifest-shard-{k}-of-3.json" for k in range(3)]


# ---------------------------------------------------------------------------------------------- SIGKILL
def batch_command(jobs: Path, out: Path, suite_dir: Path) -> list[str]:
    return [sys.executable, "-m", "scripts.cli", "batch", "run", str(jobs), "--model", "mini", "--suite-dir", str(suite_dir),
            "--device", "cpu", "--threshold", "0.02", "--out", str(out), "--no-progress"]


def n_results(out: Path) -> int:
    folder = out / "results"
    return sum(1 for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else 0


def kill_and_resume(tmp_path: Path, suite_dir: Path, n_jobs: int, n_kills: int, seed: int) -> None:
    """Kill the command ``n_kills`` times at seeded random moments, rerun it to the end, compare with a clean run."""
    rng = random.Random(seed)
    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "killed"
    write_jobs(jobs_path, tiny_jobs(n_jobs, failing=(7,)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = batch_command(jobs_path, out, suite_dir)
    progress_at_kill = []
    for _ in range(n_kills):
        before = n_results(out)
        if n_jobs - before < 2:
            break
        kill_at = before + rng.randint(1, n_jobs - before - 1)  # results to wait for, then a random fraction of a job
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while n_results(out) < kill_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.003)
        time.sleep(rng.uniform(0, 0.12))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
        progress_at_kill.append(n_results(out))
    # Every kill lands after some results; on a fast machine one may land after the last result (while the
    # manifest is written), which is a moment worth killing at too, but at least one must land mid-run.
    assert progress_at_kill and all(0 < n <= n_jobs for n in progress_at_kill), progress_at_kill
    assert any(n < n_jobs for n in progress_at_kill), progress_at_kill
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "status                      complete" in final.stdout

    ref = tmp_path / "reference"
    run_batch(jobs_path, ref, config_for(suite_dir), progress=False)
    assert result_bytes(out) == result_bytes(ref), "every job once, each result identical to an uninterrupted run"
    assert sorted(p.name for p in (out / "results").iterdir()) == sorted(f"{j['id']}.json" for j in read_jobs(jobs_path))
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["counts"]["complete"]
    assert man["counts"]["already_ok"] + man["counts"]["already_failed"] + man["counts"]["ran"] == n_jobs
    events = []
    for line in (out / "logs" / "all.events.jsonl").read_text().splitlines():
        try:
            events.append(json.loads(line)["id"])
        except ValueError:
            pass  # a line cut by a kill
    assert len(events) == len(set(events)), "no finished job was run a second time"


def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_suite_dir, restore_threads):
    kill_and_resume(tmp_path, tiny_suite_dir, n_jobs=30, n_kills=2, seed=1)


@pytest.mark.slow
def test_sigkill_many_times_then_resume(tmp_path, tiny_suite_dir, restore_threads):
    kill_and_resume(tmp_path, tiny_suite_dir, n_jobs=80, n_kills=6, seed=2)


# ---------------------------------------------------------------------------------------------- summaries
def test_summarize_counts_features_per_circuit(tmp_path, tiny_suite_dir, restore_threads):
    from scripts.batch.summarize import summarize

    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_jobs(jobs_path, tiny_jobs(10, failing=(2,)))
    run_batch(jobs_path, out, config_for(tiny_suite_dir), progress=False)
    s = summarize(out)
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    circuits = [r["circuit"] for r in results if r["status"] == "ok"]
    assert s["counts"] == dict(results=10, ok=9, failed=1, trace_ok=9, dashboard_ok=0, feature_dashboards=0)
    assert s["failures"][0]["id"] == "job-002" and "out of range" in s["failures"][0]["error"]
    assert sum(g["n_circuits"] for g in s["circuits"]["by_target"].values()) == 9
    assert "mlp0:3" in s["circuits"]["by_target"], "targets at different positions form one family"
    for row in s["circuits"]["overall"]["features"]:
        dictionary, feature = row["feature"].split(":")
        kind = "attn_feature" if dictionary.startswith("attn") else "mlp_feature"
        sums = [sum(n["attribution"] for n in c["nodes"] if n["kind"] == kind and n["layer"] == int(dictionary[-1])
                    and n["feature"] == int(feature)) for c in circuits
                if any(n["kind"] == kind and n["layer"] == int(dictionary[-1]) and n["feature"] == int(feature) for n in c["nodes"])]
        assert row["n_circuits"] == len(sums) and row["frequency"] == pytest.approx(len(sums) / 9)
        assert row["mean_attribution"] == pytest.approx(sum(sums) / len(sums), rel=1e-12, abs=1e-15)
    assert json.loads((out / "summary.json").read_text())["counts"] == s["counts"]
    page = (out / "summary.html").read_text()
    assert "Plotly.newPlot" in page and 'src="http' not in page and len(page) > 1_000_000, "plotly.js inline, offline"


def test_dashboard_jobs_and_their_index(tmp_path, tiny_suite_dir, restore_threads):
    from scripts.batch.summarize import summarize

    jobs = [dict(id="dash-mlp0-0000", kind="dashboard", dictionary="mlp0", features=[0, 5]),
            dict(id="dash-bad", kind="dashboard", dictionary="mlp7", features=[0])]
    write_jobs(tmp_path / "jobs.jsonl", jobs)
    out = tmp_path / "out"
    r = run_batch(tmp_path / "jobs.jsonl", out, config_for(tiny_suite_dir, n_tokens=1500), progress=False)
    assert (r.ok, r.failed) == (1, 1)
    bad = json.loads((out / "results" / "dash-bad.json").read_text())
    assert "no dictionary 'mlp7'" in bad["error"]
    good = json.loads((out / "results" / "dash-mlp0-0000.json").read_text())
    assert [d["feature"] for d in good["dashboards"]] == [0, 5]
    for d in good["dashboards"]:
        assert (out / d["page"]).stat().st_size > 10_000 and 0 <= d["scorecard"]["specificity"] <= 1
    s = summarize(out)
    assert s["counts"]["feature_dashboards"] == 2
    index = (out / "dashboards" / "index.html").read_text()
    assert "href='dash-mlp0-0000/mlp0_f0.html'" in index and "href='dash-mlp0-0000/mlp0_f5.html'" in index


# ---------------------------------------------------------------------------------------------- make-jobs
def test_make_jobs_fires_rule_from_a_folder_and_a_dataset(tmp_path, tiny_suite_dir, restore_threads):
    import datasets

    from saes.dictionary import encode
    from saes.mini_suite import load_mini
    from scripts.batch.make_jobs import parse_rule, trace_jobs

    texts = {"a.py": "".join(LINES[:6]), "b.txt": "\n" + "".join(LINES[6:]) + "\n\n" + "".join(LINES[:3])}
    (tmp_path / "src").mkdir()
    for name, text in texts.items():
        (tmp_path / "src" / name).write_text(text)
    suite = load_mini(tiny_suite_dir)
    rule = parse_rule("fires:mlp0:3")
    jobs = trace_jobs(suite, str(tmp_path / "src"), rule, max_jobs=500, max_tokens=12)
    assert jobs and len({j["id"] for j in jobs}) == len(jobs)
    snippets = {j["id"].split("-p")[0]: j["prompt"] for j in jobs}
    for sid, prompt in snippets.items():
        toks = suite.tokens(prompt)
        assert toks.shape[1] <= 12 and any(prompt in t for t in texts.values())
        _, cache = suite.model.run_with_cache(toks, names_filter="blocks.0.ln2.hook_normalized")
        acts = encode(suite.transcoders[0], cache["blocks.0.ln2.hook_normalized"][0])[:, 3]
        expected = [f"mlp0:3@{p}" for p in range(1, toks.shape[1]) if acts[p] > 0]
        assert sorted(j["target"] for j in jobs if j["id"].startswith(sid + "-")) == sorted(expected)
    datasets.Dataset.from_dict({"text": [texts["a.py"], texts["b.txt"]]}).save_to_disk(str(tmp_path / "ds"))
    from_ds = trace_jobs(suite, f"hf-disk:{tmp_path / 'ds'}", rule, max_jobs=500, max_tokens=12)
    assert [(j["id"], j["prompt"], j["target"]) for j in from_ds] == [(j["id"], j["prompt"], j["target"]) for j in jobs]
    assert len(trace_jobs(suite, str(tmp_path / "src"), parse_rule("default"), max_jobs=3, max_tokens=12)) == 3
    with pytest.raises(ValueError, match="is not a rule"):
        parse_rule("every:import")


def test_a_run_uses_only_the_dictionaries_named(tmp_path, tiny_suite_dir, restore_threads):
    jobs_path, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_jobs(jobs_path, [j for j in tiny_jobs(4) if not str(j.get("target", "")).startswith("attn")])
    run_batch(jobs_path, out, config_for(tiny_suite_dir, dictionaries="mlp"), progress=False)
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    ok = [r["circuit"] for r in results if r["status"] == "ok"]
    assert ok, [r.get("error") for r in results]
    kinds = {n["kind"] for c in ok for n in c["nodes"]}
    assert "mlp_feature" in kinds and not kinds & {"attn_feature", "attn_error"}, kinds
    with pytest.raises(ValueError, match="--dictionaries"):
        config_for(tiny_suite_dir, dictionaries="attn9x")
