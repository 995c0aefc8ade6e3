"""Benchmark of attribution: time, peak memory, FLOPs and achieved rate, batched against one pass per target.

    python -m scripts.bench_attribution [--suites mini gpt2-shapes] [--lengths 32 128] [--targets 16 256] [--full]
                                        [--device cpu|cuda] [--threads 1]
    python -m scripts.bench_attribution --vs-circuit-tracer [--threads 2] [--batch-size 256]   (``vs_circuit_tracer``)

1. Measure the machine's matrix-multiply peak (float32 square matmuls) as the yardstick for the rate.
2. For each suite (the embedded ``mini`` when it is built, or ``mini-shapes``, its sizes with random weights;
   ``gpt2-shapes``: GPT-2 small's shapes with random
   weights processed like GPT-2 and 24576-feature dictionaries whose encoder biases are set so that about 20
   to 60 features fire per position) and each prompt length:
   a. the circuit of the deepest layer's most active transcoder feature at the largest threshold of
      ``CIRCUIT_THRESHOLDS`` that keeps at least max(``--targets``) - 1 features; its readers are the target and
      those features, as in ``attribute``. The edge step of ``attribute`` for the first N readers (their
      in-edges from the kept nodes and the remainders from the dropped ones): batched (``--batch-size``
      readers per backward pass) and, in the same run, one backward pass per reader (the same code with batch
      size 1). The preparation of the kept sources, shared by both and done once per circuit, is its own row;
   b. full direct-effect rows (every active node, not only kept ones) for N feature readers of the last two
      layers, batched and, at the shortest prompt, one pass per reader;
   c. ``attribute`` at a few thresholds (time against kept nodes, to see how the cost grows with them), and at
      the circuit's threshold once more with one pass per reader (whole calls, hierarchical walk included).
3. FLOPs are counted by ``torch.utils.flop_counter`` (matrix products and einsums, forward and backward) on a
   separate, untimed run (for full rows with one pass per target: on 32 targets, scaled). Peak memory comes from
   another untimed run (which also warms up): on CPU the process's resident memory sampled every 2 ms above its
   level just before the run, with glibc's mmap threshold lowered for that run only so that freed tensors leave
   the resident set; on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the run. The time is
   the best of up to three further runs (one when it takes over 2 s), with no sampler running and glibc's mmap
   threshold at the 32 MiB that its dynamic threshold reaches in a long-running process: timed with the lowered
   threshold, every large temporary would be a fresh mmap paid in page faults (about 7 ms per 12 MB), a cost of
   the measurement, not of the method, and one that falls on the batched runs only. On CUDA the device is
   synchronised before each clock reading. The rate is FLOPs / time against the matrix-multiply peak of step 1
   (float32 square matmuls on the same device). The table is printed (and written as JSON with ``--json``).
4. ``circuits trace`` end to end against ``attribute`` alone, in one run: on the embedded ``mini`` suite (when
   built) and ``--trace-prompt`` (default: the prompt of ``make demo``) at ``--trace-threshold`` (default 0, every
   active node), the default target, no faithfulness curve: ``attribute`` on a linearised model built beforehand,
   then the whole ``trace`` call (tokenising, the linearised model, attribution, the tensor circuit, graph
   influence, scores and pruning), then its parts after attribution (``build_circuit``, ``score_and_prune``). The
   ratio trace / attribute is printed; FLOPs are not counted for these rows.

    python -m scripts.bench_attribution --suites mini --only-trace --threads 2
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def set_malloc_thresholds(mmap_threshold: int, trim: bool = False) -> None:
    """glibc only: allocations above ``mmap_threshold`` are mmapped (and unmapped when freed); with ``trim``, the
    free memory of the heap goes back to the OS now, so that what a run allocates shows in the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold)
    if trim:
        libc.malloc_trim(0)


TIMING_MMAP_THRESHOLD = 32 << 20  # where glibc's dynamic threshold settles in a long-running process
MEMORY_MMAP_THRESHOLD = 128 << 10  # freed tensors leave the resident set, so that it follows live memory


class PeakMemory:
    """Peak memory above the starting level: CPU resident memory sampled in a background thread, or CUDA's
    allocator statistics."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start, self.peak = torch.cuda.memory_allocated(), 0
            return self
        set_malloc_thresholds(MEMORY_MMAP_THRESHOLD, trim=True)
        self.start, self.peak, self._stop = rss_bytes(), 0, False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.start)
        set_malloc_thresholds(TIMING_MMAP_THRESHOLD)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(fn, device: torch.device, quick: float = 2.0) -> tuple[float, float, int]:
    """Peak memory of one call (which also warms up), then the best wall time and the best process CPU time of
    more calls, timed with no sampler running: 10 when a call takes under 0.1 s, 3 up to ``quick`` seconds, else 1.

    A short call can be descheduled for a time slice or two; more repetitions of the short
    calls find an undisturbed one, and the CPU time, which does not count the time the process waits for a core,
    is given beside the wall time for every row."""
    with PeakMemory(device) as mem:
        t = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - t
    best, best_cpu = float("inf"), float("inf")
    for _ in range(10 if first < 0.1 else 3 if first <= quick else 1):
        synchronize(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best, best_cpu, mem.peak


def gpt2_shaped_suite(d_sae: int = 24576, fire: int = 40, seed: int = 0, sharpen: float = 30.0):
    """GPT-2 small's shapes, random weights processed like GPT-2, sparse random dictionaries (see docstring)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saes.dictionary import DictionarySpec, build_dictionary
    from saes.lm import process_weights
    from saes.suite import Suite

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                                  act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
                                  model_name="gpt2-shapes", original_architecture="GPT2LMHeadModel", seed=seed)
    model = HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        # Sharpen the random attention (GPT-2's heads attend to few tokens; near-uniform random patterns would
        # shrink hook_z with position, and no single encoder bias could then keep the sparsity in range).
        for block in model.blocks:
            block.attn.W_Q.mul_(sharpen)
    process_weights(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # One random encoder/decoder pair per dictionary kind, shared by every layer (the cost is the same as 24
    # distinct ones; the memory is not: 24 x 151 MB would not fit on a small machine). Biases are per layer.
    attn, mlp = {}, {}
    for kind, store in (("attn_sae", attn), ("transcoder", mlp)):
        make_spec = DictionarySpec.attn_sae if kind == "attn_sae" else DictionarySpec.transcoder
        shared = build_dictionary(make_spec(0, 768, d_sae), seed=seed)
        for p in shared.parameters():
            p.requires_grad_(False)
        for layer in range(cfg.n_layers):
            spec = make_spec(layer, 768, d_sae)
            sae = copy.copy(shared)
            sae._parameters = dict(shared._parameters)  # W_enc, W_dec shared; biases replaced below
            sae.b_enc = torch.nn.Parameter(shared.b_enc.clone(), requires_grad=False)
            sae.cfg = copy.deepcopy(shared.cfg)
            sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out = spec.hook_in, spec.hook_out
            sae.cfg.metadata.layer = layer
            store[layer] = sae
    suite = Suite(name="gpt2-shapes", model=model, attn_saes=attn, transcoders=mlp)
    calibrate_sparsity(suite, fire, seed)
    return suite


@torch.no_grad()
def calibrate_sparsity(suite, fire: int, seed: int, n_tokens: int = 128) -> None:
    """Set each dictionary's encoder bias to one constant so that about ``fire`` features are active per position."""
    from saes.suite import flatten_z

    tokens = torch.randint(0, suite.model.cfg.d_vocab, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    _, cache = suite.model.run_with_cache(tokens)
    for layer in range(suite.n_layers):
        for sae, x in ((suite.attn_saes[layer], flatten_z(cache[f"blocks.{layer}.attn.hook_z"][0])),
                       (suite.transcoders[layer], cache[f"blocks.{layer}.ln2.hook_normalized"][0])):
            pre = x @ sae.W_enc
            tau = pre.topk(fire, dim=-1).values[:, -1].median()
            sae.b_enc.data = torch.full_like(sae.b_enc, -float(tau))


def readers_for(lm, n: int, seed: int = 0):
    """N feature readers: active features of the last two layers at random positions (mixed attn and MLP)."""
    from circuits.targets import FeatureTarget

    pool = []
    for layer in range(max(0, lm.n_layers - 2), lm.n_layers):
        for kind in ("attn_feature", "mlp_feature"):
            g = lm.feature_group(kind, layer)
            pos, slot = g.mask.nonzero(as_tuple=True)
            pool += [FeatureTarget(kind, layer, int(g.feature[p, s]), int(p)) for p, s in zip(pos, slot)]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return [pool[int(i)] for i in order[:n]]


def direct_rows(lm, index, readers, batch_size):
    from circuits.attribution import direct_effects, reading_vectors

    with torch.no_grad():
        for start in range(0, len(readers), batch_size):
            direct_effects(lm, index, reading_vectors(lm, readers[start : start + batch_size]))


CIRCUIT_THRESHOLDS = (0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0)


def circuit_readers(lm, index, target, n: int):
    """The circuit of ``target`` at the largest threshold keeping >= n - 1 features, and its readers (see 2a)."""
    from circuits.attribution import hierarchical_attribution

    with torch.no_grad():
        for threshold in CIRCUIT_THRESHOLDS:
            hier = hierarchical_attribution(lm, index, target, threshold)
            features = [int(c) for c in hier.kept.nonzero()[:, 0] if lm.groups[int(index.group[c])].is_feature]
            if len(features) + 1 >= n:
                break
    return threshold, hier, [target] + [index.feature_target(c) for c in features]


def edges(lm, sources, readers, batch_size, autograd=False):
    from circuits.attribution import edge_rows

    with torch.no_grad():
        for start in range(0, len(readers), batch_size):
            edge_rows(lm, sources, readers[start : start + batch_size], autograd=autograd)


def run(args) -> list[dict]:
    from circuits.attribution import NodeIndex, attribute, kept_sources
    from circuits.linear_model import LinearisedModel
    from circuits.trace import default_target

    device = torch.device(args.device)
    set_malloc_thresholds(TIMING_MMAP_THRESHOLD)
    peak = matmul_peak(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}; "
          f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    rows: list[dict] = []
    header = f"{'suite':<12}{'pos':>5}{'nodes':>8}  {'what':<44}{'targets':>8}{'time s':>9}{'cpu s':>8}{'peak MB':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'% peak':>7}"
    print(header)
    print("-" * len(header))

    def report(row):
        rows.append(row)
        rate = row["flops"] / row["seconds"] if row["seconds"] > 0 else float("nan")
        row["rate"] = rate
        print(f"{row['suite']:<12}{row['pos']:>5}{row['nodes']:>8}  {row['what']:<44}{row['targets']:>8}{row['seconds']:>9.4f}{row['cpu_seconds']:>8.4f}"
              f"{row['peak_bytes'] / 2**20:>9.1f}{row['flops'] / 1e9:>9.2f}{rate / 1e9:>9.2f}{100 * rate / peak:>7.1f}", flush=True)

    for name in args.suites:
        if name == "mini-shapes":
            from saes.suite import Suite
            from saes.testing import make_dictionary, make_model

            # mini's shapes with random weights and random TopK dictionaries (for machines without saes/mini)
            model = make_model(n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=256)
            suite = Suite("mini-shapes", model,
                          {l: make_dictionary(model, "attn_sae", l, 1024, "topk", 32, seed=10 + l) for l in range(4)},
                          {l: make_dictionary(model, "transcoder", l, 1024, "topk", 32, seed=20 + l) for l in range(4)})
            vocab = suite.model.cfg.d_vocab
        elif name == "mini":
            from saes.suite import MINI_DIR, load_suite

            if not (MINI_DIR / "cfg.json").is_file():
                print(f"# skipping mini: {MINI_DIR}/cfg.json does not exist yet (build it with scripts/build_mini.py)")
                continue
            suite = load_suite("mini")
            vocab = suite.model.cfg.d_vocab
        else:
            suite = gpt2_shaped_suite(fire=args.fire)
            vocab = suite.model.cfg.d_vocab
        for p in suite.model.parameters():
            p.requires_grad_(False)
        suite.to(device)
        for length in args.lengths:
            tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
            lm = LinearisedModel(suite, tokens)
            index = NodeIndex(lm)
            counts = torch.cat([g.mask.sum(-1)[1:] for g in lm.groups if g.is_feature]).float()  # BOS aside
            lo, med, hi = (float(counts.quantile(q)) for q in (0.05, 0.5, 0.95))
            print(f"# {name} pos={length}: {index.n} nodes; active features per position and dictionary: "
                  f"median {med:.0f}, 5-95% {lo:.0f}-{hi:.0f}")
            target = default_target(lm)
            thr, hier, circuit = circuit_readers(lm, index, target, max(args.targets))
            kept = int(hier.kept.sum())
            print(f"#   circuit of {target.spec} at threshold {thr:g}: {kept} kept nodes, {len(circuit)} readers")
            holder = {}

            def prepare():
                with torch.no_grad():
                    holder["s"] = kept_sources(lm, index, hier.kept)

            flops = count_flops(prepare)
            t, c, m = measure(prepare, device)
            base = dict(suite=name, pos=length, nodes=index.n, kept=kept, circuit_threshold=thr)
            report({**base, "targets": 0, "what": f"kept sources, {kept} kept (once)", "seconds": t, "cpu_seconds": c, "peak_bytes": m, "flops": flops})
            sources = holder["s"]
            for n in args.targets:
                readers = circuit[:n]
                row = {**base, "targets": len(readers)}
                flops = count_flops(lambda: edges(lm, sources, readers, args.batch_size))
                t, c, m = measure(lambda: edges(lm, sources, readers, args.batch_size), device)
                report({**row, "what": f"edges, batched ({args.batch_size}/pass)", "seconds": t, "cpu_seconds": c, "peak_bytes": m, "flops": flops})
                flops1 = count_flops(lambda: edges(lm, sources, readers, 1))
                t1, c1, m1 = measure(lambda: edges(lm, sources, readers, 1), device)
                report({**row, "what": "edges, one pass per target", "seconds": t1, "cpu_seconds": c1, "peak_bytes": m1, "flops": flops1,
                        "speedup_batched": t1 / t, "speedup_batched_cpu": c1 / c})
                print(f"#   edges among {kept} kept nodes: batched is {t1 / t:.1f}x (CPU time {c1 / c:.1f}x) faster than one pass per target "
                      f"at {len(readers)} targets")
                # The naive method: one autograd backward pass through the linearised model per target.
                flops2 = count_flops(lambda: edges(lm, sources, readers, 1, autograd=True))
                t2, c2, m2 = measure(lambda: edges(lm, sources, readers, 1, autograd=True), device)
                report({**row, "what": "edges, one autograd backward per target", "seconds": t2, "cpu_seconds": c2, "peak_bytes": m2,
                        "flops": flops2, "speedup_batched": t2 / t, "speedup_batched_cpu": c2 / c})
                print(f"#   edges among {kept} kept nodes: batched is {t2 / t:.1f}x (CPU time {c2 / c:.1f}x) faster than one autograd backward "
                      f"pass per target at {len(readers)} targets")
            del sources, holder
            for n in args.targets:
                readers = readers_for(lm, n)
                base = dict(suite=name, pos=length, nodes=index.n, targets=len(readers))
                flops = count_flops(lambda: direct_rows(lm, index, readers, args.batch_size))
                t, c, m = measure(lambda: direct_rows(lm, index, readers, args.batch_size), device)
                report({**base, "what": f"all-node rows, batched ({args.batch_size}/pass)", "seconds": t, "cpu_seconds": c, "peak_bytes": m, "flops": flops})
                if length == min(args.lengths) or args.full:
                    # FLOPs of one pass per target: counted on the first 32 readers, scaled to all of them
                    # (counting them all would double a run that is slow by design).
                    sample = readers[:32]
                    flops1 = count_flops(lambda: direct_rows(lm, index, sample, 1)) * len(readers) / len(sample)
                    t1, c1, m1 = measure(lambda: direct_rows(lm, index, readers, 1), device)
                    report({**base, "what": "all-node rows, one pass per target", "seconds": t1, "cpu_seconds": c1, "peak_bytes": m1, "flops": flops1,
                            "speedup_batched": t1 / t, "speedup_batched_cpu": c1 / c})
                    print(f"#   all-node rows: batched is {t1 / t:.1f}x (CPU time {c1 / c:.1f}x) faster than one pass per target at {len(readers)} targets")
            runs = [(threshold, args.batch_size) for threshold in args.thresholds]
            if length == min(args.lengths) or args.full:
                runs += [r for r in ((thr, args.batch_size), (thr, 1)) if r not in runs]
            seconds = {}
            for threshold, batch_size in runs:
                holder = {}

                def full():
                    holder["a"] = attribute(lm, target, threshold=threshold, batch_size=batch_size, progress=False)

                flops = count_flops(full)
                t, c, m = measure(full, device)
                seconds[threshold, batch_size] = t, c
                a = holder["a"]
                how = "one pass per target" if batch_size == 1 else f"{batch_size}/pass"
                report(dict(suite=name, pos=length, nodes=index.n, targets=len(a.reader_cols),
                            what=f"attribute thr={threshold:g}: {int(a.hierarchy.kept.sum())} kept, {how}",
                            seconds=t, cpu_seconds=c, peak_bytes=m, flops=flops, kept=int(a.hierarchy.kept.sum()), edges=len(a.edge_weight),
                            batch_size=batch_size, max_relative_residual=a.max_relative_residual))
            if (thr, 1) in seconds:
                print(f"#   whole attribute at threshold {thr:g} (hierarchical walk included): batched is "
                      f"{seconds[thr, 1][0] / seconds[thr, args.batch_size][0]:.1f}x (CPU time "
                      f"{seconds[thr, 1][1] / seconds[thr, args.batch_size][1]:.1f}x) faster than one pass per target")
            del lm, index
        del suite
    if not args.no_trace:
        trace_rows(args, report)
    return rows


DEMO_PROMPT = "import os\nimport sys\n\ndef main(args):\n    for name in args:\n        print(name"


def trace_rows(args, report) -> None:
    """Step 4 of the module docstring."""
    from circuits.attribution import attribute
    from circuits.graph import build_circuit
    from circuits.influence import score_and_prune
    from circuits.linear_model import LinearisedModel
    from circuits.trace import default_target, trace
    from saes.suite import MINI_DIR, load_suite

    if not (MINI_DIR / "cfg.json").is_file():
        print(f"# skipping the trace rows: {MINI_DIR}/cfg.json does not exist yet (build it with scripts/build_mini.py)")
        return
    device = torch.device(args.device)
    suite = load_suite("mini", device=str(device))
    for p in suite.model.parameters():
        p.requires_grad_(False)
    prompt, thr = args.trace_prompt, args.trace_threshold
    lm = LinearisedModel(suite, suite.tokens(prompt))
    target = default_target(lm)
    holder: dict = {}

    def attribute_alone():
        holder["a"] = attribute(lm, target, threshold=thr, batch_size=args.trace_batch_size, progress=False)

    def trace_all():
        holder["t"] = trace(suite, prompt, target, threshold=thr, batch_size=args.trace_batch_size, faithfulness=False,
                            progress=False)

    def build():
        holder["c"] = build_circuit(lm, holder["a"], prompt, suite.name)

    def score():
        score_and_prune(holder["c"])

    t_a, c_a, m_a = measure(attribute_alone, device, quick=60.0)  # best of three: the ratio needs both steady
    a = holder["a"]
    base = dict(suite="mini", pos=lm.n_pos, nodes=a.index.n, targets=len(a.reader_cols), flops=0, kept=int(a.hierarchy.kept.sum()),
                edges=len(a.edge_weight))
    report({**base, "what": f"attribute alone, thr={thr:g}", "seconds": t_a, "cpu_seconds": c_a, "peak_bytes": m_a})
    t_t, c_t, m_t = measure(trace_all, device, quick=60.0)
    circuit = holder["t"].circuit
    report({**base, "what": "trace end to end, no faithfulness", "seconds": t_t, "cpu_seconds": c_t, "peak_bytes": m_t,
            "ratio_to_attribute": t_t / t_a, "shown_nodes": int(circuit.node_shown.sum()), "shown_edges": int(circuit.edge_shown.sum())})
    t_b, c_b, m_b = measure(build, device)
    report({**base, "what": "  of which build_circuit", "seconds": t_b, "cpu_seconds": c_b, "peak_bytes": m_b})
    t_s, c_s, m_s = measure(score, device)
    report({**base, "what": "  of which score_and_prune", "seconds": t_s, "cpu_seconds": c_s, "peak_bytes": m_s})
    print(f"#   trace end to end on {lm.n_pos} tokens at threshold {thr:g} ({base['kept']} kept nodes, {base['edges']} edges; "
          f"{int(circuit.node_shown.sum())} nodes and {int(circuit.edge_shown.sum())} edges shown): {t_t / t_a:.2f}x attribute "
          f"alone (CPU time {c_t / c_a:.2f}x)")


LONG_PROMPT = ("import os\nimport sys\nimport json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n"
               "def main(args):\n    for name in args:\n        data = load(name)\n        for key in data:\n"
               "            print(key, data[key])\n    return 0\n\nif __name__ == \"__main__\":\n    sys.exit(main(sys.argv[1:]))\n")


def vs_circuit_tracer(args) -> list[dict]:
    """The full graph of transcoder features on mini (``--dictionaries mlp``), here and with circuit-tracer 0.5.

    Per prompt, the same work on both sides: every active transcoder feature and the target (the logit of the
    model's top next token at the last position) as readers, with their in-edges from every node. Here: the
    linearised model, ``attribute(threshold=0)`` (hierarchical pass, edges, per-head parts, certificate) and,
    as its own row, ``build_circuit`` of the result. circuit-tracer: ``attribute(max_feature_nodes=None)`` with
    that one logit as its target (its forward passes, feature and logit rows, packing of the graph). Both use
    ``--batch-size`` readers per backward pass. Model and transcoder loading is outside the timings. Each time is
    the best of ``--repeats`` runs after one untimed warm-up.
    """
    from circuit_tracer.attribution.attribute import attribute as ct_attribute

    from circuits.attribution import attribute
    from circuits.circuit_tracer_compat import circuit_tracer_replacement_model
    from circuits.graph import build_circuit
    from circuits.linear_model import LinearisedModel
    from circuits.targets import LogitTarget
    from saes.suite import load_suite

    suite = load_suite("mini", dictionaries="mlp")
    for p in suite.model.parameters():
        p.requires_grad_(False)
    replacement = circuit_tracer_replacement_model(suite)
    print(f"# mini with its transcoders only (attention passed through), {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch_size}, best of {args.repeats}")
    header = f"{'tokens':>7}{'features':>10}{'edges':>10}  {'what':<52}{'time s':>9}"
    print(header)
    print("-" * len(header), flush=True)
    rows = []

    def best(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    for prompt in args.ct_prompts:
        tokens = suite.tokens(prompt)
        n_pos = tokens.shape[1]
        token = int(suite.model(tokens)[0, -1].argmax())
        target_of = lambda lm: LogitTarget((token,), (1.0,), lm.n_pos - 1)

        def ours():
            lm = LinearisedModel(suite, tokens)
            return lm, attribute(lm, target_of(lm), threshold=0.0, batch_size=args.batch_size, progress=False)

        def theirs():
            return ct_attribute(tokens[0], replacement, attribution_targets=torch.tensor([token]), max_feature_nodes=None,
                                batch_size=args.batch_size)

        t_ours, (lm, result) = best(ours)
        t_ct, graph = best(theirs)
        n_feat = int(graph.active_features.shape[0])
        n_edges_ct = int((graph.adjacency_matrix != 0).sum())
        measured = [("ours: linearise + attribute (threshold 0)", t_ours, len(result.edge_weight)),
                    ("circuit-tracer 0.5: attribute(max_feature_nodes=None)", t_ct, n_edges_ct)]
        if args.ct_build_circuit:
            t_graph, _ = best(lambda: build_circuit(lm, result, prompt, suite.name))
            measured.insert(1, ("ours: build_circuit of that result", t_graph, len(result.edge_weight)))
        for what, seconds, edges in measured:
            print(f"{n_pos:>7}{n_feat:>10}{edges:>10}  {what:<52}{seconds:>9.3f}", flush=True)
            rows.append(dict(suite="mini-mlp", pos=n_pos, features=n_feat, edges=edges, what=what, seconds=seconds,
                             threads=torch.get_num_threads(), batch_size=args.batch_size))
        print(f"{'':>27}  ratio circuit-tracer / ours (attribute): {t_ct / t_ours:.2f}x", flush=True)
    replacement.reset_hooks(including_permanent=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", default=["mini", "gpt2-shapes"], choices=["mini", "mini-shapes", "gpt2-shapes"],
                   help="mini-shapes: mini's sizes with random weights and TopK dictionaries (vocabulary 300)")
    p.add_argument("--lengths", nargs="+", type=int, default=[32, 128])
    p.add_argument("--targets", nargs="+", type=int, default=[16, 256])
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.02])
    p.add_argument("--batch-size", type=int, default=256, help="readers per backward pass in the batched runs")
    p.add_argument("--fire", type=int, default=40, help="features active per position in the gpt2-shapes dictionaries")
    p.add_argument("--full", action="store_true", help="time one pass per target at every prompt length, not only the shortest")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--trace-prompt", default=DEMO_PROMPT, help="prompt of the trace-against-attribute rows (default: make demo's)")
    p.add_argument("--trace-threshold", type=float, default=0.0, help="attribution threshold of the trace rows")
    p.add_argument("--trace-batch-size", type=int, default=64, help="readers per pass in the trace rows (trace's default)")
    p.add_argument("--no-trace", action="store_true", help="skip the trace-against-attribute rows")
    p.add_argument("--only-trace", action="store_true", help="only the trace-against-attribute rows")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model, dictionaries and attribution run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); on a shared, oversubscribed machine 1 "
                        "avoids every small operation waiting for a descheduled second thread")
    p.add_argument("--vs-circuit-tracer", action="store_true",
                   help="instead: time the full transcoder-only graph of mini here and with circuit-tracer 0.5 (installed "
                        "--no-deps) on the same prompts, in one run")
    p.add_argument("--ct-prompts", nargs="+", default=[DEMO_PROMPT, LONG_PROMPT], help="prompts of --vs-circuit-tracer")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row of --vs-circuit-tracer (best kept)")
    p.add_argument("--ct-build-circuit", action="store_true", help="--vs-circuit-tracer: also time build_circuit of our result")
    args = p.parse_args(argv)
    if args.vs_circuit_tracer:
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = vs_circuit_tracer(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build or machine has no CUDA device (torch.cuda.is_available() is False); "
                "use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only_trace:
        args.suites = []
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
