"""``circuits batch run --backend ray`` on a local Ray instance (CPU): the same results as the local backend, the
same resume behaviour; and the install hint where Ray is missing. ``make setup`` installs Ray, so these run in CI."""

from __future__ import annotations

import json
import sys

import pytest

from scripts.batch.jobs import write_jobs
from scripts.batch.runner import run_batch
from test_batch import config_for, restore_threads, result_bytes, tiny_jobs, tiny_suite_dir  # noqa: F401  (fixtures)


def test_ray_backend_gives_the_local_results_and_resumes(tmp_path, tiny_suite_dir, restore_threads):  # noqa: F811
    pytest.importorskip("ray", reason="Ray is the optional extra `distributed`; `make setup` installs it")
    jobs_path = tmp_path / "jobs.jsonl"
    write_jobs(jobs_path, tiny_jobs(12, failing=(5,)))
    cfg = config_for(tiny_suite_dir)
    local = run_batch(jobs_path, tmp_path / "local", cfg, progress=False)
    (tmp_path / "ray" / "results").mkdir(parents=True)
    for name in ("job-000.json", "job-005.json"):  # done before: the Ray run must skip them, as the local one does
        (tmp_path / "ray" / "results" / name).write_bytes((tmp_path / "local" / "results" / name).read_bytes())
    (tmp_path / "ray" / "results" / ".job-001.json.x1y2.tmp").write_text("{")  # a killed write
    r = run_batch(jobs_path, tmp_path / "ray", cfg, backend="ray", workers=2, progress=False)
    assert (r.already_ok, r.already_failed, r.ran, r.ok, r.failed, r.temps_removed) == (1, 1, 10, 10, 0, 1)
    assert r.complete and local.complete
    assert result_bytes(tmp_path / "ray") == result_bytes(tmp_path / "local")
    man = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert man["backend"]["name"] == "ray" and man["device"]["workers"] == 2 and man["device"]["devices"] == ["cpu"]
    assert man["status"] == "complete"


def test_without_ray_the_command_says_how_to_install_it(tmp_path, tiny_suite_dir, monkeypatch, capsys):  # noqa: F811
    from scripts.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, as where it is not installed
    write_jobs(tmp_path / "j.jsonl", tiny_jobs(2))
    rc = main(["batch", "run", str(tmp_path / "j.jsonl"), "--model", "mini", "--suite-dir", str(tiny_suite_dir),
               "--backend", "ray", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pip install 'circuits-toolkit[distributed]'" in err and "--backend ray needs Ray" in err
    assert not (tmp_path / "o").exists()
