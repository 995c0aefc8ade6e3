"""``circuits trace``: explain one scalar of one prompt as a circuit of features, and write it out."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scripts.cards_args import add_card_args, cards_from_args, check_card_args
from scripts.common import add_model_args, load_suite_from_args, write_json

FILES_HELP = """files written in --out:
  graph.safetensors + graph_meta.json  the whole circuit, compact and exact: every kept node and edge, the
                                       shown masks, per-head parts, scores (read back with Circuit.load(DIR))
  graph.html                           the explorer: one offline page, opens on the shown (pruned) view; every
                                       feature node has a label, and a card when there is text to build it from
  graph.json                           networkx node-link JSON, for networkx and graph tools
  graph.graphml                        GraphML, for Gephi, Cytoscape, igraph
  attribution_graph.json               circuit-tracer / Neuronpedia attribution-graph format
  summary.json                         counts, scores, the faithfulness curve
graph.json, graph.graphml and attribution_graph.json hold the shown view unless --full-exports is given
(every kept edge: slow and large for big graphs)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="trace a local circuit for one prompt",
        description="Hierarchical attribution in the linearised model (frozen attention and LayerNorm, dictionaries "
                    "with error nodes), then pruning by influence to the view the files and the explorer open on.",
        epilog=FILES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to run the model on")
    p.add_argument("--target", default=None,
                   help='what to explain: mlpL:F[@P], attnL:F[@P], logit:"tok"[-"tok"][@P], logit:#id, attnL.H:Q->K; '
                        "default: the most active transcoder feature at the last position, in the deepest layer with one "
                        "active there (an attention feature if no transcoder feature is)")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="drop nodes with |T_s| < threshold * |target| during the backward walk (0 keeps every active node)")
    p.add_argument("--batch-size", type=int, default=64, help="readers per batched backward pass")
    p.add_argument("--prune", type=float, nargs=2, metavar=("NODE", "EDGE"), default=(0.8, 0.98),
                   help="the shown view: nodes covering NODE of the total graph influence, then edges covering EDGE of "
                        "the edge influence (circuit-tracer's rule; default 0.8 0.98). Every kept node and edge stays in "
                        "graph.safetensors; scores are reported for both")
    p.add_argument("--no-prune", action="store_true", help="show every kept node and edge")
    p.add_argument("--full-exports", action="store_true",
                   help="write every kept edge to graph.json, graph.graphml and attribution_graph.json, not only the shown view")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the ablation curve")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--dashboards", action="store_true",
                   help="also write a dashboard with scorecard for every shown feature node (out/dashboards/) and link them from "
                        "their cards (not for cross-layer transcoder features, which sae-vis cannot draw)")
    p.add_argument("--out", type=Path, required=True, help="folder for the output files (created if missing)")
    add_card_args(p)
    p.set_defaults(handler=run)


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, an --out that cannot be created or written (nothing is created here)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is an existing file, not a folder; give a folder path")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: the folder is not writable; choose another --out")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out} cannot be created: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be created: {parent} is not writable; choose another --out")


def write_page(circuit, path: Path, cards: dict | None = None, labels: dict | None = None, cards_note: str | None = None) -> None:
    """The explorer page (``graph.html``) with the circuit's cards and labels."""
    from circuits.explorer import write_explorer
    from circuits.explorer_data import explorer_payload

    write_explorer(explorer_payload(circuit, cards=cards, labels=labels, cards_note=cards_note), path)


def run(args: argparse.Namespace) -> int:
    from circuits.graph import write_attribution_graph, write_graphml, write_node_link
    from circuits.trace import trace

    if args.threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {args.threshold}")
    prune = None if args.no_prune else tuple(args.prune)
    if prune is not None and not all(0 < v <= 1 for v in prune):
        raise ValueError(f"--prune NODE EDGE: both must be in (0, 1], got {prune[0]:g} {prune[1]:g}")
    out: Path = args.out
    check_out_dir(out)
    suite = load_suite_from_args(args)
    check_card_args(args, suite)
    if args.dashboards and suite.clt is not None:
        from analysis.dashboards import check_dashboard_dictionaries

        check_dashboard_dictionaries(suite, [f"mlp{l}" for l in range(suite.n_layers)])
    result = trace(suite, args.prompt, args.target, threshold=args.threshold, batch_size=args.batch_size,
                   faithfulness=not args.no_faithfulness, progress=not args.no_progress, prune=prune)
    circuit = result.circuit
    out.mkdir(parents=True, exist_ok=True)
    circuit.save(out)
    full = args.full_exports
    write_node_link(circuit, out / "graph.json", full=full)
    write_graphml(circuit, out / "graph.graphml", full=full)
    links: dict[str, str] = {}
    if args.dashboards:
        from analysis.dashboards import write_circuit_dashboards

        links = write_circuit_dashboards(suite, circuit.nodes(shown_only=True), out, progress=not args.no_progress)
        print(f"wrote {len(set(links.values()))} feature dashboards in {out}/dashboards")
    from analysis.cards import attach_dashboards
    from scripts.cards_args import circuit_features

    cards, labels, note = cards_from_args(args, suite, circuit_features(circuit.nodes()))
    attach_dashboards(cards, links, out / "dashboards" if links else None)
    write_attribution_graph(circuit, out / "attribution_graph.json", labels=labels, full=full)
    write_page(circuit, out / "graph.html", cards=cards, labels=labels, cards_note=note)
    shown = circuit.node_shown
    summary = dict(
        model=circuit.model, prompt=circuit.prompt, target=circuit.target, target_value=circuit.target_value,
        threshold=circuit.threshold, pruning=circuit.pruning,
        nodes=circuit.counts(), edges=circuit.edge_counts(), n_nodes=circuit.n_nodes, n_edges=circuit.n_edges,
        shown_nodes=circuit.counts(shown_only=True), shown_edges=circuit.edge_counts(shown_only=True),
        n_shown_nodes=int(shown.sum()), n_shown_edges=int(circuit.edge_shown.sum()), exports="full" if full else "shown",
        max_relative_residual=circuit.max_relative_residual, scores=circuit.scores, faithfulness=circuit.faithfulness,
    )
    summary["cards"] = dict(n_cards=len(cards), note=note)
    if args.dashboards:
        summary["dashboards"] = links
    write_json(out / "summary.json", summary)
    shown_counts = circuit.counts(shown_only=True)
    print(f"target {circuit.target} = {circuit.target_value:.4g}   ({len(circuit.tokens)} tokens, threshold {circuit.threshold:g})")
    print(f"{'nodes':<16}{'kept':>7}{'shown':>7}")
    for kind, n in circuit.counts().items():
        print(f"  {kind:<14}{n:>7}{shown_counts.get(kind, 0):>7}")
    shown_e = circuit.edge_counts(shown_only=True)
    print(f"{'edges':<28}{'kept':>8}{'shown':>7}")
    for kind, n in sorted(circuit.edge_counts().items()):
        print(f"  {kind:<26}{n:>8}{shown_e.get(kind, 0):>7}")
    print(f"largest relative residual  {circuit.max_relative_residual:.2e}")
    s = circuit.scores
    print(f"replacement score {s['replacement']:.3f}   completeness score {s['completeness']:.3f}   (every kept node and edge)")
    if circuit.pruning:
        print(f"replacement score {s['shown_replacement']:.3f}   completeness score {s['shown_completeness']:.3f}   "
              f"(shown view: pruned at {circuit.pruning['node_threshold']:g} {circuit.pruning['edge_threshold']:g})")
    if circuit.faithfulness:
        row = circuit.faithfulness[-1]
        print(f"faithfulness of all {row['n_nodes']} nodes {row['faithfulness']:.3f}   completeness (ablating them) "
              f"{row['completeness']:.3f}   (zero ablation, curve in summary.json)")
        view = next((r for r in circuit.faithfulness if r.get("shown")), None)
        if view is not None and circuit.pruning:
            print(f"faithfulness of the {view['n_nodes']} shown nodes {view['faithfulness']:.3f}   completeness (ablating them) "
                  f"{view['completeness']:.3f}")
    print(f"wrote {out}/graph.safetensors, graph_meta.json, graph.json, graph.graphml, attribution_graph.json, graph.html, summary.json")
    return 0
