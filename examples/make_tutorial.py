"""Write ``examples/tutorial.ipynb`` (without outputs) from the cells below.

1. The tour's steps are written once, as code that reads only ``suite``, ``prompt``, ``target`` and ``out``.
2. The notebook runs them on the mini suite, then again on GPT-2 small in cells tagged ``needs-hub``: the same
   code, so that the offline run of the first half (``tests/test_tutorial.py``) checks the second half's code too.

    python examples/make_tutorial.py            # rewrites examples/tutorial.ipynb
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PATH = Path(__file__).with_name("tutorial.ipynb")
HUB_TAG = "needs-hub"

INTRO = """\
# Tracing a circuit, and testing what it claims

This notebook is a tour of the toolkit for a researcher. On one prompt it

1. traces a local circuit: an attribution graph of dictionary features whose edges add up, exactly, to the
   target's value;
2. opens it in the explorer;
3. reads the card of the feature that matters most;
4. tests that feature's strongest edge by intervention, first in the linearised model the graph describes, then
   in the real model, and lets the model write with the feature switched off;
5. makes a dashboard for that feature;
6. and then runs the same code on GPT-2 small.

Steps 1 to 5 use the embedded suite `mini` (a 4-layer model trained on Python source, with an attention-output SAE
and an MLP transcoder at every layer). They run offline, in well under a minute on a laptop CPU; the test suite
executes them (`tests/test_tutorial.py`). Step 6 needs the Hugging Face hub, or a filled hub cache.

Run it with the toolkit's environment as the kernel (`make setup` installs the package and ipykernel there).
Files go to `$TUTORIAL_OUT` (default `out/tutorial`, relative to the notebook's folder). Feature-card statistics are cached in
`$CIRCUITS_CARDS_CACHE` (default `~/.cache/circuits-toolkit/cards`), so a second run skips that pass. The math
behind every number is in `docs/attribution.md`; the command-line form of each step is in `docs/circuits.md`."""

SETUP = """\
import json
import os
import warnings
from pathlib import Path

import torch
from IPython.display import FileLink, IFrame, display

torch.set_num_threads(1)  # the mini suite is small: one thread is fastest, and leaves the others free
OUT = Path(os.environ.get("TUTORIAL_OUT", "out/tutorial"))
warnings.filterwarnings("ignore", message="IProgress not found")  # without ipywidgets, progress bars are text
warnings.filterwarnings("ignore", module="eindex")  # sae-vis's indexing library warns about a coming torch change


def show_page(path, height=640):
    \"\"\"A link to an offline page, and the page itself in a frame (the path is relative to the notebook's folder).\"\"\"
    rel = os.path.relpath(path)
    display(FileLink(rel))
    display(IFrame(rel, width="100%", height=height))"""

MINI_INTRO = """\
## 1. Trace the demo prompt

A *suite* is a model with its dictionaries: `attn{L}`, a sparse autoencoder on `blocks.L.attn.hook_z`, and
`mlp{L}`, a transcoder from `blocks.L.ln2.hook_normalized` to `blocks.L.hook_mlp_out`. The prompt is the one
`make demo` traces. With no `target`, `trace` explains the most active transcoder feature of the deepest layer at
the last token; any target spec works too (`'logit:" args"'`, `'mlp1:613@5'`, `'attn2.1:22->11'`: see
`docs/circuits.md`)."""

MINI_SETUP = """\
from saes.suite import load_suite

suite = load_suite("mini")
prompt = "import os\\nimport sys\\n\\ndef main(args):\\n    for name in args:\\n        print(name"
target = None  # the default target
out = OUT / suite.name"""

TRACE_NOTE = """\
`trace` freezes the attention patterns and LayerNorm scales of this prompt, which makes the model linear in the
features' activations, and walks back from the target. Every kept node's activation equals the sum of its
in-edges, a constant (biases) and a remainder (what comes from nodes dropped below `threshold`);
`max_relative_residual` is the certificate, the largest relative failure of that identity over all nodes. The
replacement score is the share of the target's influence that reaches the embeddings rather than error nodes or
remainders; completeness is the influence-weighted share of the nodes' inputs that comes from non-error nodes
(`shown_*`: the same on the pruned view).

`faithfulness=False` skips the ablation curve (one real forward pass per point, the slow part of a trace); the
command line computes it by default. `circuit.save(out)` writes the compact form that `Circuit.load(out)` reads
back."""

TRACE = """\
from circuits.trace import trace

result = trace(suite, prompt, target, threshold=0.01, faithfulness=False, progress=False)
circuit = result.circuit
circuit.save(out)
print(f"target {circuit.target} = {circuit.target_value:.4f} on {len(circuit.tokens)} tokens")
print(f"kept {circuit.n_nodes} nodes and {circuit.n_edges} edges; the pruned view shows "
      f"{int(circuit.node_shown.sum())} nodes and {int(circuit.edge_shown.sum())} edges")
print(f"largest relative residual {circuit.max_relative_residual:.1e}")
print("scores:", ", ".join(f"{k} {v:.3f}" for k, v in circuit.scores.items()))"""

EXPLORER_NOTE = """\
## 2. Open the explorer

The explorer is one self-contained HTML page (no network): residual-stream stages as rows, tokens as columns,
pruned by influence as circuit-tracer prunes. Click a node for its edges and its *feature card*; click an edge
into an attention feature for its split by head. Cards are built first, from held-out text: for `mini` the
held-out files of its embedded corpus. The command line reads 65,536 tokens for them; 8,192 keep this quick."""

EXPLORER = """\
from analysis.cards import CardConfig, build_feature_cards, card_text_source
from circuits.explorer import write_explorer
from circuits.explorer_data import explorer_payload

features = [(n.dictionary, n.feature) for n in circuit.nodes() if n.kind in ("attn_feature", "mlp_feature")]
cards = build_feature_cards(suite, features, card_text_source(suite, None), config=CardConfig(n_tokens=8_192),
                            progress=False)
page = out / "graph.html"
write_explorer(explorer_payload(circuit, cards=cards), page)
print(f"{len(cards)} feature cards; explorer written to {page}")
show_page(page, height=720)"""

CARD_NOTE = """\
## 3. Read the top feature's card

Which feature matters most? *Graph influence* counts every path from a node to the target, not only its direct
edge. A card holds a feature's top contexts on held-out text (the highlighted token is where it fires most),
the tokens its decoder direction promotes and suppresses through the unembedding, and a short label built from
both."""

CARD = """\
feature_nodes = [n for n in circuit.nodes() if n.kind in ("attn_feature", "mlp_feature")]
top = max(feature_nodes, key=lambda n: n.influence)
card = cards[f"{top.dictionary}:{top.feature}"]
print(f"top feature {top.id} on token {top.token!r}: activation {top.activation:.3f}, influence {top.influence:.3f}")
print("label:", card["label"])
print(card["title"])
for ctx in card["contexts"][:5]:
    i, toks = ctx["index"], ctx["tokens"]
    print(f"  {ctx['activation']:6.2f}  {''.join(toks[:i])[-30:]!r:>34} [{toks[i]!r}] {''.join(toks[i + 1:])!r}")
print("promotes:  ", " ".join(repr(t) for t, _ in card["top_logits"][:6]))
print("suppresses:", " ".join(repr(t) for t, _ in card["bottom_logits"][:6]))"""

EDGE_NOTE = """\
## 4. Test its strongest edge by intervention

An edge is a claim: in the linearised model, the source's activation contributes `weight` to the reader (the
circuit's target or another feature). `intervene` tests it. With `freeze="all"` every other node, the attention
patterns and the LayerNorm scales stay at their clean values, so switching the source off (`0`) must move the
reader by exactly minus the edge; the cell asserts it."""

EDGE = """\
from circuits.interventions import intervene

out_edges = [e for e in circuit.edges() if e.source == top.id and (e.target == "target" or ":" in e.target)]
edge = max(out_edges, key=lambda e: abs(e.weight))
reader = circuit.target if edge.target == "target" else edge.target  # a feature's node id is also a target spec
print(f"strongest edge: {edge.source} -> {edge.target} ({reader})")

frozen = intervene(suite, prompt, {top.id: 0}, freeze="all", target=reader, lm=result.model)
print(f"{reader}: clean {frozen.target.clean:.5f}, with {top.id} off {frozen.target.intervened:.5f}")
print(f"edge weight:                {edge.weight:+.6f}")
print(f"change, everything frozen:  {frozen.target.change:+.6f}")
assert abs(frozen.target.change + edge.weight) <= 1e-4 * max(1.0, abs(frozen.target.clean)), "the edge does not hold"
print("the reader moved by exactly minus the edge")"""

LIVE_NOTE = """\
The same switch in the real model (`freeze="none"`: the dictionaries spliced in with their error terms, patterns,
LayerNorm and every other feature live) says how much of the linear claim survives once the rest of the model
responds. `freeze="attention"` sits between the two. With `generate=N` the model writes N greedy tokens, with the
feature held at its value at every new position too; a value like `"*3"` clamps it high instead."""

LIVE = """\
live = intervene(suite, prompt, {top.id: 0}, freeze="none", target=reader, lm=result.model, generate=12)
print(f"change, real model:         {live.target.change:+.6f}")
print("next token, clean:      ", ", ".join(f"{t.token!r} {t.prob:.2f}" for t in live.top_logits_clean[:4]))
print("next token, feature off:", ", ".join(f"{t.token!r} {t.prob:.2f}" for t in live.top_logits_intervened[:4]))
print(f"writes, clean:       {live.generation.clean!r}")
print(f"writes, feature off: {live.generation.intervened!r}")
high = intervene(suite, prompt, {top.id: "*3"}, freeze="none", target=reader, lm=result.model, generate=12)
print(f"writes, feature x3:  {high.generation.intervened!r}")"""

DASH_NOTE = """\
## 5. A dashboard for the feature

`write_feature_dashboards` writes a sae-vis dashboard (top and quantile examples, activation and logit
histograms) with a scorecard beside it: specificity and sensitivity for the token class the feature is claimed
to detect, what it writes to the logits, the loss when it is ablated, and its largest correlation with a single
MLP neuron. The page carries its scripts and works offline. Linking it from the feature's card and writing the
explorer again makes the card open it."""

DASH = """\
from analysis.cards import attach_dashboards
from analysis.dashboards import write_feature_dashboards

pages = write_feature_dashboards(suite, {top.dictionary: [top.feature]}, out / "dashboards", n_tokens=8_192)
dashboard = out / "dashboards" / pages[(top.dictionary, top.feature)]
score = json.loads(dashboard.with_suffix(".scorecard.json").read_text())
print(", ".join(f"{k} {score[k]:.3g}" for k in ("density", "max_act", "max_neuron_corr", "ablation_delta_loss")))
attach_dashboards(cards, {top.id: f"dashboards/{dashboard.name}"})
write_explorer(explorer_payload(circuit, cards=cards), page)
show_page(dashboard, height=900)"""

HUB_NOTE = """\
## 6. The same on GPT-2 small

The cells below are tagged `needs-hub`: they need GPT-2 small and its dictionaries (the attention-output SAEs of
Kissane et al. and the transcoders of Dunefsky et al.) from the Hugging Face hub, or a filled hub cache with
`HF_HUB_OFFLINE=1` (the `huggingface-cli download` lines are in the README's GPT-2 small section). The cards read
a slice of `NeelNanda/pile-10k`, which also comes from the hub (offline, give `card_text_source` a folder or a
text file instead). The code is that of steps 1 to 5; only the suite,
the prompt and the target change. On a CPU the trace takes minutes rather than seconds; a GPU is used when there
is one."""

HUB_SETUP = """\
torch.set_num_threads(os.cpu_count() or 1)  # GPT-2 small is worth every core
suite = load_suite("gpt2-small", device="cuda" if torch.cuda.is_available() else "cpu")
prompt = "When Mary and John went to the store, John gave a drink to"
target = 'logit:" Mary"-" John"'  # the indirect object against the subject
out = OUT / suite.name"""

STEPS = [(TRACE_NOTE, TRACE), (EXPLORER_NOTE, EXPLORER), (CARD_NOTE, CARD), (EDGE_NOTE, EDGE), (LIVE_NOTE, LIVE),
         (DASH_NOTE, DASH)]


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(INTRO), new_code_cell(SETUP), new_markdown_cell(MINI_INTRO), new_code_cell(MINI_SETUP)]
    for note, code in STEPS:
        cells += [new_markdown_cell(note), new_code_cell(code)]
    cells += [new_markdown_cell(HUB_NOTE)]
    for code in [HUB_SETUP] + [code for _, code in STEPS]:
        cells.append(new_code_cell(code, metadata={"tags": [HUB_TAG]}))
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def main() -> None:
    tmp = PATH.with_name(PATH.name + ".tmp")
    nbformat.write(build(), tmp)
    os.replace(tmp, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
