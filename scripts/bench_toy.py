"""Benchmark: the n=20, m=5 toy-model sweep (20 sparsities, 10,000 steps, batch 1024) trained as one batched model
against a Python loop that trains the 20 instances one after another, in one run.

    .venv/bin/python -m scripts.bench_toy [--steps 10000] [--loop-fraction 1] [--threads 1] [--out out/bench_toy.json]

Both paths run the same ``train_toy_model`` (one ``bmm``/``baddbmm`` per product over the instance axis, no Python
work per instance). Each is timed twice: wall clock, and the CPU time of this process (``time.process_time``),
which other processes disturb much less. ``--loop-fraction`` < 1 times the loop on that fraction of
the steps of every instance and extrapolates linearly (each step costs the same; the table says which numbers are
measured and which extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--loop-fraction", type=float, default=1.0, help="fraction of --steps to time the loop on (1: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.loop_fraction <= 1:
        p.error("--loop-fraction must be in (0, 1]")

    import torch

    from analysis.toy_experiments import ToySuiteConfig, twenty_five_config
    from analysis.toy_models import train_toy_model

    torch.set_num_threads(args.threads)
    cfg = twenty_five_config(ToySuiteConfig(steps=args.steps, batch_size=args.batch_size), replicas=1)
    load_before = os.getloadavg()[0]

    t, c = time.perf_counter(), time.process_time()
    train_toy_model(cfg, progress=True, desc="batched (20 instances)")
    batched_s, batched_cpu = time.perf_counter() - t, time.process_time() - c

    loop_steps = max(1, round(args.steps * args.loop_fraction))
    t, c = time.perf_counter(), time.process_time()
    for i, prob in enumerate(cfg.feature_probability):
        train_toy_model(replace(cfg, feature_probability=(prob,), steps=loop_steps), progress=True, desc=f"loop, instance {i + 1}/20")
    loop_measured_s, loop_cpu = time.perf_counter() - t, time.process_time() - c
    scale = args.steps / loop_steps
    loop_full_s, loop_full_cpu = loop_measured_s * scale, loop_cpu * scale
    load_after = os.getloadavg()[0]

    rows = [
        {"mode": "batched, one model", "instances": cfg.n_instances, "steps_timed": args.steps, "measured_s": round(batched_s, 1),
         "measured_cpu_s": round(batched_cpu, 1), "full_run_s": round(batched_s, 1), "full_run_cpu_s": round(batched_cpu, 1),
         "full_run_is": "measured"},
        {"mode": "loop over instances", "instances": cfg.n_instances, "steps_timed": loop_steps, "measured_s": round(loop_measured_s, 1),
         "measured_cpu_s": round(loop_cpu, 1), "full_run_s": round(loop_full_s, 1), "full_run_cpu_s": round(loop_full_cpu, 1),
         "full_run_is": "measured" if loop_steps == args.steps else f"extrapolated x{scale:g}"},
    ]
    print(f"n=20, m=5, {cfg.n_instances} sparsities, batch {args.batch_size}, {args.steps} steps; torch threads {args.threads}; "
          f"1-min load average {load_before:.1f} before, {load_after:.1f} after (on {os.cpu_count()} CPUs)")
    print(f"{'mode':<22}{'instances':>10}{'steps timed':>13}{'wall s':>9}{'CPU s':>9}{'full wall s':>13}{'full CPU s':>12}  full run is")
    for r in rows:
        print(f"{r['mode']:<22}{r['instances']:>10}{r['steps_timed']:>13}{r['measured_s']:>9}{r['measured_cpu_s']:>9}"
              f"{r['full_run_s']:>13}{r['full_run_cpu_s']:>12}  {r['full_run_is']}")
    print(f"speed-up of batching: {loop_full_s / batched_s:.2f}x wall clock, {loop_full_cpu / batched_cpu:.2f}x CPU time")
    if args.out:
        from saes.io import atomic_write_json

        atomic_write_json(args.out, {"rows": rows, "speedup": round(loop_full_s / batched_s, 2),
                                     "speedup_cpu_time": round(loop_full_cpu / batched_cpu, 2), "threads": args.threads,
                                     "load_average_before_after": [load_before, load_after], "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
