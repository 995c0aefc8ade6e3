"""``circuits trace``: explain one scalar of one prompt as a circuit of features, and write it out."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common import add_model_args, load_suite_from_args, write_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="trace a local circuit for one prompt",
        description="Hierarchical attribution in the linearised model (frozen attention and LayerNorm, dictionaries "
                    "with error nodes). Writes graph.json (networkx node-link), graph.graphml, "
                    "attribution_graph.json (circuit-tracer/Neuronpedia format), graph.html and summary.json.",
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to run the model on")
    p.add_argument("--target", default=None,
                   help='what to explain: mlpL:F[@P], attnL:F[@P], logit:"tok"[-"tok"][@P], logit:#id, attnL.H:Q->K; '
                        "default: the most active transcoder feature at the last position of the deepest layer")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="drop nodes with |T_s| < threshold * |target| during the backward walk (0 keeps every active node)")
    p.add_argument("--batch-size", type=int, default=64, help="readers per batched backward pass")
    p.add_argument("--prune", type=float, nargs=2, metavar=("NODE", "EDGE"), default=None,
                   help="also prune by influence (e.g. 0.8 0.98) before writing; the unpruned identities are checked first")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the ablation curve")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--dashboards", action="store_true",
                   help="also write a dashboard with scorecard for every feature node (out/dashboards/) and link each node of graph.html to it")
    p.add_argument("--out", type=Path, required=True, help="folder for the output files")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from circuits.graph import write_attribution_graph, write_graphml, write_node_link
    from circuits.influence import graph_scores, prune_by_influence
    from circuits.trace import trace
    from circuits.viewer import write_html

    if args.threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {args.threshold}")
    suite = load_suite_from_args(args)
    result = trace(suite, args.prompt, args.target, threshold=args.threshold, batch_size=args.batch_size,
                   faithfulness=not args.no_faithfulness, progress=not args.no_progress)
    circuit = result.circuit
    if args.prune:
        circuit = prune_by_influence(circuit, *args.prune)
        circuit.scores = graph_scores(circuit)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_node_link(circuit, out / "graph.json")
    write_graphml(circuit, out / "graph.graphml")
    write_attribution_graph(circuit, out / "attribution_graph.json")
    write_html(circuit, out / "graph.html")
    summary = dict(
        model=circuit.model, prompt=circuit.prompt, target=circuit.target, target_value=circuit.target_value,
        threshold=circuit.threshold, nodes=circuit.counts(), edges=circuit.edge_counts(), n_edges=len(circuit.edges),
        max_relative_residual=circuit.max_relative_residual, scores=circuit.scores, faithfulness=circuit.faithfulness,
    )
    if args.dashboards:
        from analysis.dashboards import link_graph_page, write_circuit_dashboards

        summary["dashboards"] = write_circuit_dashboards(suite, circuit.nodes, out, progress=not args.no_progress)
        link_graph_page(out / "graph.html", summary["dashboards"])
        print(f"wrote {len(set(summary['dashboards'].values()))} feature dashboards in {out}/dashboards, linked from graph.html")
    write_json(out / "summary.json", summary)
    print(f"target {circuit.target} = {circuit.target_value:.4g}   ({len(circuit.tokens)} tokens, threshold {circuit.threshold:g})")
    print(f"{'nodes':<16}{'count':>7}")
    for kind, n in circuit.counts().items():
        print(f"  {kind:<14}{n:>7}")
    print(f"{'edges':<28}{'count':>7}")
    for kind, n in sorted(circuit.edge_counts().items()):
        print(f"  {kind:<26}{n:>7}")
    print(f"largest relative residual  {circuit.max_relative_residual:.2e}")
    print(f"replacement score {circuit.scores['replacement']:.3f}   completeness score {circuit.scores['completeness']:.3f}")
    if circuit.faithfulness:
        row = circuit.faithfulness[-1]
        print(f"faithfulness of all {row['n_nodes']} nodes {row['faithfulness']:.3f}   completeness (ablating them) "
              f"{row['completeness']:.3f}   (zero ablation, curve in summary.json)")
    print(f"wrote {out}/graph.json, graph.graphml, attribution_graph.json, graph.html, summary.json")
    return 0
