"""``circuits batch``: circuits and dashboards over a dataset, sharded, resumable, locally or on Ray.

    circuits batch make-jobs --model mini --source mini-heldout --target-rule fires:mlp0:917 --max-jobs 1000 --out jobs.jsonl
    circuits batch run jobs.jsonl --model mini --out runs/b1 [--device cuda] [--shard K/N] [--backend ray]
    circuits batch summarize runs/b1

The library is ``scripts/batch/``; the guide is ``docs/batch.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.common import add_model_args, dumps, load_suite_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="circuits and dashboards over a dataset: job files, sharded resumable runs, Ray, summaries",
                              description="Batch runs (docs/batch.md): make-jobs, run, summarize.")
    sub = p.add_subparsers(dest="batch_command", metavar="STEP", required=True)

    m = sub.add_parser("make-jobs", help="write a JSONL job file from a text source and a target rule, or dashboard jobs")
    add_model_args(m)
    m.add_argument("--kind", choices=("trace", "dashboard"), default="trace")
    m.add_argument("--source", default="mini-heldout",
                   help="trace jobs: mini-heldout, a folder of text files, hf:NAME[:SPLIT] or hf-disk:PATH (datasets)")
    m.add_argument("--glob", default="**/*", help="files of a folder source (default **/*)")
    m.add_argument("--text-column", default="text", help="column of a datasets source")
    m.add_argument("--target-rule", default="default",
                   help="default (most active last-layer transcoder feature at the end) or fires:DICT:F[>T]: one job per "
                        "position where the feature fires, e.g. fires:mlp0:917 (mini's import detector)")
    m.add_argument("--max-tokens", type=int, default=32, help="tokens per snippet, BOS included (default 32)")
    m.add_argument("--max-per-snippet", type=int, default=None, help="at most this many positions per snippet (fires rule)")
    m.add_argument("--max-jobs", type=int, default=1000)
    m.add_argument("--threshold", type=float, default=None, help="write this threshold into every trace job")
    m.add_argument("--faithfulness", action="store_true", help="ask for the ablation curve in every trace job")
    m.add_argument("--features", default="all", help="dashboard jobs: all, a range 0-63 or a list 3,17")
    m.add_argument("--per-job", type=int, default=32, help="dashboard jobs: features per job (default 32)")
    m.add_argument("--n-tokens", type=int, default=None, help="dashboard jobs: held-out tokens per dashboard")
    m.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    m.add_argument("--out", type=Path, required=True, help="the JSONL job file to write")
    m.set_defaults(handler=run_make_jobs)

    r = sub.add_parser("run", help="run a job file: one result per job, resumable, --shard K/N, --backend ray")
    r.add_argument("jobs", type=Path, help="JSONL job file")
    add_model_args(r)
    r.add_argument("--out", type=Path, required=True, help="output folder (results/, manifest, logs/); rerun to resume")
    r.add_argument("--shard", default=None, help="K/N: run only shard K (0-based) of N, e.g. $SLURM_ARRAY_TASK_ID/4")
    r.add_argument("--backend", choices=("local", "ray"), default="local")
    r.add_argument("--ray-address", default=None, help="an existing Ray cluster (auto, ray://host:10001); default: a local one")
    r.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else one per CPU)")
    r.add_argument("--threshold", type=float, default=0.01, help="default node threshold of trace jobs (default 0.01)")
    r.add_argument("--faithfulness", action="store_true", help="compute the ablation curve for jobs that do not say (off by default: it costs a forward pass per point)")
    r.add_argument("--n-tokens", type=int, default=50_000, help="default held-out tokens of dashboard jobs")
    r.add_argument("--batch-size", type=int, default=None, help="readers per backward pass (default: 64 on CPU, 512 on CUDA)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (default 1)")
    r.add_argument("--save-graph", action="store_true", help="also write each circuit's full graph as graphs/<id>.json")
    r.add_argument("--retry-failed", action="store_true", help="redo jobs whose recorded result is a failure")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the table")
    r.set_defaults(handler=run_run)

    s = sub.add_parser("summarize", help="merge the results of a run folder: feature frequency and attribution, dashboard index")
    s.add_argument("dir", type=Path, help="the --out folder of `circuits batch run`")
    s.add_argument("--top", type=int, default=50, help="features kept per target (default 50)")
    s.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    s.set_defaults(handler=run_summarize)


def run_make_jobs(args: argparse.Namespace) -> int:
    from scripts.batch.jobs import write_jobs
    from scripts.batch.make_jobs import dashboard_jobs, parse_rule, trace_jobs

    if args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    if args.kind == "trace":
        rule = parse_rule(args.target_rule)
        options = {}
        if args.threshold is not None:
            options["threshold"] = args.threshold
        if args.faithfulness:
            options["faithfulness"] = True
        suite = load_suite_from_args(args)
        jobs = trace_jobs(suite, args.source, rule, args.max_jobs, args.max_tokens, args.glob, args.text_column, options,
                          args.max_per_snippet)
    else:
        suite = load_suite_from_args(args)
        # --dictionaries (shared by every command) has already narrowed the suite to the dictionaries wanted
        jobs = dashboard_jobs(suite, "all", args.features, args.per_job, args.n_tokens)
    if not jobs:
        raise ValueError("the source and rule gave no jobs; try another --target-rule, a lower threshold or a larger source")
    write_jobs(args.out, jobs)
    print(f"wrote {len(jobs)} {args.kind} jobs to {args.out}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from scripts.batch.jobs import parse_shard
    from scripts.batch.runner import format_report, manifest_path, run_batch
    from scripts.batch.worker import RunConfig

    shard = parse_shard(args.shard)
    config = RunConfig(model=args.model, suite_dir=str(args.suite_dir) if args.suite_dir else None,
                       dictionaries=getattr(args, "dictionaries", None), device=args.device,
                       threshold=args.threshold, faithfulness=args.faithfulness, n_tokens=args.n_tokens,
                       batch_size=args.batch_size, threads=args.threads, save_graph=args.save_graph)
    try:
        report = run_batch(args.jobs, args.out, config, shard, args.backend, args.retry_failed, not args.no_progress,
                           args.ray_address, args.workers)
    except ModuleNotFoundError as e:  # Ray missing: the message says how to install it
        print(f"circuits batch run: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(manifest_path(args.out, *shard).read_text(encoding="utf-8"), end="")
    else:
        print(format_report(report, args.out))
        print(f"wrote {args.out}/results/<id>.json and {manifest_path(args.out, *shard)}")
    return 0 if report.complete else 1


def run_summarize(args: argparse.Namespace) -> int:
    from scripts.batch.summarize import format_summary, summarize

    summary = summarize(args.dir, top=args.top)
    if args.json:
        print(dumps(summary))
    else:
        print(format_summary(summary))
        written = ["summary.json"] + (["summary.html"] if summary["counts"]["trace_ok"] else []) + \
                  (["dashboards/index.html"] if summary["counts"]["feature_dashboards"] else [])
        print(f"wrote {', '.join(f'{args.dir}/{w}' for w in written)}")
    return 0
