"""Benchmark: dashboards for 64 features over 200,000 tokens of the mini suite, the toolkit's way against
sae-vis called the plain way (``SaeVisData.create`` on sae-lens's ``HookedSAETransformer``), in one run.

    python -m scripts.bench_dashboards [--model mini] [--dictionaries attn1 mlp1] [--features 64] [--tokens 200000]

Each (dictionary, mode) runs in a fresh child process, so that its peak memory is its own:
- ``sae-vis``: ``SaeVisData.create`` with its default config, then ``save_feature_centric_vis`` (one page, CDN
  scripts; the plain way);
- ``toolkit``: ``build_dictionary_dashboards`` without scorecards, then one self-contained page with all
  features (the same data as sae-vis's page, checked equal in ``tests/test_dashboards.py``);
- ``toolkit+scorecards``: what ``circuits dashboard`` does: the same plus a scorecard per feature (ablation
  runs, neuron correlations) and one page per feature.
Time is wall-clock from the tokens in memory to the pages on disk; peak memory is the process's peak resident
set size during that phase (``VmHWM`` after resetting it), and the growth over the resident size before it.
Tokens: the held-out files first, then training files, until ``--tokens`` (BOS not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("sae-vis", "toolkit", "toolkit+scorecards")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def corpus_token_set(model, n_tokens: int):
    from analysis.scorecard import token_set_from_texts
    from saes.corpus import read_text, split_files

    train, heldout = split_files()
    return token_set_from_texts(model, (read_text(p) for p in [*heldout, *train]), n_tokens=n_tokens)


def child(args: argparse.Namespace) -> None:
    """One (dictionary, mode) measurement; prints one JSON line."""
    import torch

    from analysis import sae_vis_adapter as adapter
    from analysis.dashboards import build_dictionary_dashboards, dictionary_page_html, vis_config, write_feature_dashboards
    from saes.suite import load_suite

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.model, path=args.suite_dir)
    tokens = corpus_token_set(suite.model, args.tokens)
    feats = list(range(args.features))
    out = Path(args.workdir) / f"{args.dictionary}-{args.mode.replace('+', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    plain_model = adapter.hooked_sae_transformer(suite.model) if args.mode == "sae-vis" else None
    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    t0 = time.perf_counter()
    if args.mode == "sae-vis":
        from sae_vis.data_storing_fns import SaeVisData

        view = adapter.vis_view(suite.dictionary(args.dictionary), n_ctx=tokens.rows.shape[1])
        data = SaeVisData.create(sae=view, model=plain_model, tokens=tokens.rows, cfg=vis_config(feats),
                                 vocab_dict=adapter.vocab_dict(suite.model.tokenizer))
        data.save_feature_centric_vis(str(out / "page.html"))
    elif args.mode == "toolkit":
        dd = build_dictionary_dashboards(suite, args.dictionary, feats, tokens, with_scorecards=False)
        (out / "page.html").write_text(dictionary_page_html(dd, suite.name), encoding="utf-8")
    else:
        write_feature_dashboards(suite, {args.dictionary: feats}, out, tokens=tokens)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps(dict(dictionary=args.dictionary, mode=args.mode, seconds=round(seconds, 1), tokens=tokens.n_tokens,
                          features=len(feats), peak_rss_mb=round(peak / 1024), added_mb=round((peak - rss_before) / 1024),
                          output_mb=round(size / 2**20, 1), threads=torch.get_num_threads())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini")
    p.add_argument("--suite-dir", type=Path, default=None)
    p.add_argument("--dictionaries", nargs="+", default=["attn1", "mlp1"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--features", type=int, default=64, help="features 0..N-1 of each dictionary")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in each child (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dictionary", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboards-") as work:
        for d in args.dictionaries:
            for mode in args.modes:
                cmd = [sys.executable, "-m", "scripts.bench_dashboards", "--child", "--model", args.model, "--dictionary", d,
                       "--mode", mode, "--features", str(args.features), "--tokens", str(args.tokens), "--workdir", work,
                       "--threads", str(args.threads)]
                if args.suite_dir:
                    cmd += ["--suite-dir", str(args.suite_dir)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"benchmark child {d}/{mode} failed (exit {res.returncode})")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"done {d} {mode}: {rows[-1]['seconds']} s", file=sys.stderr)
    print(f"{rows[0]['features']} features, {rows[0]['tokens']} tokens, torch threads {rows[0]['threads']}")
    print(f"| dictionary | mode | seconds | peak RSS (MB) | added over start (MB) | pages (MB) |")
    print(f"|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dictionary']} | {r['mode']} | {r['seconds']} | {r['peak_rss_mb']} | {r['added_mb']} | {r['output_mb']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
