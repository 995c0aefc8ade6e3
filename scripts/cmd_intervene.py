"""``circuits intervene``: set, scale or shift nodes of a prompt's circuit and show what the target and logits do."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common import add_model_args, load_suite_from_args, write_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "intervene", help="set, scale or shift features and read the target, other nodes and the top logits",
        description="Intervene on nodes of the circuit of one prompt. --freeze all (default): the linearised model "
                    "with every other node held at its clean value, so a target moves by exactly its edges from "
                    "the nodes set; attention: the real model with the dictionaries spliced in and attention "
                    "patterns frozen; none: the real model with the dictionaries spliced in. Prints a table and, "
                    "with --out, writes OUT/intervention.json.",
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to run the model on")
    p.add_argument("--set", dest="sets", action="append", required=True, metavar="NODE=VALUE",
                   help="a node (mlpL:F@P, attnL:F@P, mlpL.error@P, attnL.error@P, mlpL.out@P, embed@P, pos_embed@P) and its value: "
                        "a number (set), *F (scale the clean activation, e.g. *0 or *2) or +D / +-D (shift it); "
                        "repeat for several nodes")
    p.add_argument("--freeze", choices=["all", "attention", "none"], default="all",
                   help="what stays at the clean pass (default: all)")
    p.add_argument("--target", default=None,
                   help='what to read: mlpL:F[@P], attnL:F[@P], logit:"tok"[-"tok"][@P], logit:#id, attnL.H:Q->K; '
                        "default: the trace default (the most active transcoder feature at the last position, deepest layer first)")
    p.add_argument("--node", dest="nodes", action="append", default=[], metavar="SPEC",
                   help="also read this feature or target before and after (repeatable)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also write N greedy tokens with and without the intervention (freeze attention or none)")
    p.add_argument("--top-k", type=int, default=10, help="top logits to show (default 10)")
    p.add_argument("--out", type=Path, default=None, help="write OUT/intervention.json")
    p.set_defaults(handler=run)


def parse_set(text: str) -> tuple[str, str]:
    """``NODE=VALUE`` split at the last '=' (node ids hold none)."""
    node, sep, value = text.rpartition("=")
    if not sep or not node.strip() or not value.strip():
        raise ValueError(f"--set {text!r}: write it as NODE=VALUE, e.g. --set mlp1:613@5=0 or --set attn2:17@5=*2")
    return node.strip(), value.strip()


def check_out_dir(out: Path | None) -> None:
    """Refuse an output folder that cannot be made (it, or a folder above it, is a file) before any work."""
    if out is None:
        return
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--out {out}: {p} is a file, not a folder; choose another --out")
            break


def run(args: argparse.Namespace) -> int:
    from circuits.interventions import check_node_syntax, intervene, parse_value

    sets = [parse_set(s) for s in args.sets]
    for node, value in sets:  # the syntax of every node and value before loading anything
        check_node_syntax(node)
        parse_value(value, node)
    nodes = [n for n, _ in sets]
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"a node is set twice in {nodes}; give one --set per node")
    if args.generate < 0:
        raise ValueError(f"--generate must be >= 0, got {args.generate}")
    check_out_dir(args.out)
    suite = load_suite_from_args(args)
    result = intervene(suite, args.prompt, dict(sets), freeze=args.freeze, target=args.target, nodes=args.nodes,
                       top_k=args.top_k, generate=args.generate)
    print(f"freeze={result.freeze}   {len(result.tokens)} tokens")
    for i in result.interventions:
        print(f"  set {i.node:<22} {i.value:>8}   activation {i.clean:.4g} -> {i.new:.4g}")
    print(f"{'readout':<28}{'clean':>12}{'intervened':>12}{'change':>12}")
    for kind, r in [("target", result.target)] + [("node", n) for n in result.nodes]:
        print(f"  {kind + ' ' + r.spec:<26}{r.clean:>12.4g}{r.intervened:>12.4g}{r.change:>12.4g}")
    print(f"top logits at position {result.logit_pos} ({result.tokens[result.logit_pos]!r}):")
    print(f"  {'clean':<30}{'intervened':<30}")
    for a, b in zip(result.top_logits_clean, result.top_logits_intervened):
        print(f"  {repr(a.token) + f' {a.logit:.3f}':<30}{repr(b.token) + f' {b.logit:.3f}':<30}")
    if result.generation is not None:
        print(f"greedy {result.generation.n} tokens, clean:      {result.generation.clean!r}")
        print(f"greedy {result.generation.n} tokens, intervened: {result.generation.intervened!r}")
    if args.out is not None:
        write_json(args.out / "intervention.json", result.to_dict())
        print(f"wrote {args.out / 'intervention.json'}")
    return 0
