"""Helpers shared by the subcommands: model choice, device choice, JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mini", help="suite name: mini, mini-skip, mini-clt (embedded, offline), gpt2-small, gpt2-small-clt (need the hub)")
    p.add_argument("--suite-dir", type=Path, default=None, help="load the mini-format suite from this folder instead")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (cuda when available)")
    p.add_argument("--dictionaries", default=None, metavar="SPEC",
                   help="use only some of the suite's dictionaries: all (default), none, attn, mlp, attnL, attnA-B, "
                        "mlpL, mlpA-B, comma-separated (e.g. mlp for transcoders only, attn0-3,mlp); attention "
                        "without an SAE passes through, an MLP without a transcoder is one frozen node per position")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def load_suite_from_args(args: argparse.Namespace):
    from saes.suite import load_suite, parse_dictionaries

    spec = getattr(args, "dictionaries", None)
    if spec is not None:
        try:
            parse_dictionaries(spec, None)
        except ValueError as e:
            raise ValueError(f"--dictionaries: {e}") from None
    return load_suite(args.model, device=resolve_device(args.device), path=args.suite_dir, dictionaries=spec)


def write_json(path: Path, obj: Any) -> None:
    from saes.io import atomic_write_json

    atomic_write_json(Path(path), obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)


def add_experiment_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the CPU experiments (toy, mnist): threads, PNG figures, progress bars."""
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models run fastest on one)")
    p.add_argument("--no-png", action="store_true", help="write only the HTML figures")
    p.add_argument("--no-progress", action="store_true")
