// The circuit explorer. Reads the payload from <script id="circuit-data">, prunes it like circuit-tracer's
// prune_graph, lays it out by residual-stream stage (rows) and token position (columns), draws nodes as SVG and
// edges on a canvas, and exposes window.explorer (see circuits/explorer.py for the API).
(function () {
  "use strict";
  const T0 = performance.now();
  const D = JSON.parse(document.getElementById("circuit-data").textContent);
  const meta = D.meta || {};
  const NODES = D.nodes, EDGES = D.edges;
  const nN = NODES.id.length, nE = EDGES.src.length;
  const src = Int32Array.from(EDGES.src), dst = Int32Array.from(EDGES.dst);
  const wt = Float64Array.from(EDGES.weight, (x) => (x === null ? 0 : x));
  const absw = wt.map(Math.abs);
  const ROWS = D.rows, TOKENS = D.tokens;
  const kindOf = NODES.kind, rowOf = NODES.row, posOf = NODES.pos;
  const labelOf = NODES.label || NODES.id;
  const npId = NODES.np_id || NODES.id;
  const cards = D.cards || {};
  const byId = new Map();
  NODES.id.forEach((id, i) => byId.set(id, i));
  const TARGET = Math.max(0, kindOf.indexOf("target"));
  const FEATURE = new Set(["attn_feature", "mlp_feature"]);
  const TOKEN = new Set(["embed", "pos_embed"]);
  // 0: always kept by the node threshold (token embeddings, the target); 1: a feature (needs an in-edge and an
  // out-edge); 2: an error or frozen output (needs an out-edge).
  const cls = new Uint8Array(nN);
  for (let i = 0; i < nN; i++) cls[i] = i === TARGET || TOKEN.has(kindOf[i]) ? 0 : FEATURE.has(kindOf[i]) ? 1 : 2;

  // ------------------------------------------------------------------ adjacency (CSR by destination and source)
  function csr(key) {
    const start = new Int32Array(nN + 1);
    for (let e = 0; e < nE; e++) start[key[e] + 1]++;
    for (let i = 0; i < nN; i++) start[i + 1] += start[i];
    const fill = start.slice(0, nN), list = new Int32Array(nE);
    for (let e = 0; e < nE; e++) list[fill[key[e]]++] = e;
    return { start, list };
  }
  const IN = csr(dst), OUT = csr(src);

  // Topological order (Kahn): every edge goes from an earlier to a later node of `topo`.
  const topo = (function () {
    const indeg = new Int32Array(nN);
    for (let e = 0; e < nE; e++) indeg[dst[e]]++;
    const order = new Int32Array(nN);
    let head = 0, tail = 0;
    for (let i = 0; i < nN; i++) if (indeg[i] === 0) order[tail++] = i;
    while (head < tail) {
      const s = order[head++];
      for (let k = OUT.start[s]; k < OUT.start[s + 1]; k++) {
        const d = dst[OUT.list[k]];
        if (--indeg[d] === 0) order[tail++] = d;
      }
    }
    if (tail !== nN) throw new Error("the circuit has a cycle: edges must run forward through the model");
    return order;
  })();

  // ------------------------------------------------------------------ pruning (circuit-tracer's prune_graph)
  // Influence on the target through the row-normalised |adjacency|: infl[s] = sum_d N[d, s] (infl[d] + [d = target]),
  // computed in one pass in reverse topological order. `mask` (or null for all) selects the edges.
  // A node's |remainder| (the part of its input from sources the attribution threshold dropped), when the
  // payload carries it, counts in its row sum as unexplained input, as in circuits/influence.py.
  const REM = NODES.remainder ? Float64Array.from(NODES.remainder, (x) => Math.abs(x || 0)) : new Float64Array(nN);
  function influence(mask) {
    const rowSum = Float64Array.from(REM);
    for (let e = 0; e < nE; e++) if (!mask || mask[e]) rowSum[dst[e]] += absw[e];
    const infl = new Float64Array(nN);
    for (let k = nN - 1; k >= 0; k--) {
      const d = topo[k];
      const m = infl[d] + (d === TARGET ? 1 : 0);
      if (m === 0) continue;
      const scale = m / Math.max(rowSum[d], 1e-10);
      for (let j = IN.start[d]; j < IN.start[d + 1]; j++) {
        const e = IN.list[j];
        if (!mask || mask[e]) infl[src[e]] += absw[e] * scale;
      }
    }
    return { infl, rowSum };
  }

  // The smallest score kept so that the kept scores cover `threshold` of the total (circuit-tracer's
  // find_threshold: first index whose cumulative fraction reaches the threshold). `nAll` counts the zero
  // entries of the dense matrix that the edge list does not hold.
  function findThreshold(scores, threshold, nAll) {
    const sorted = Float64Array.from(scores).sort().reverse();
    let total = 0;
    for (let i = 0; i < sorted.length; i++) total += sorted[i];
    if (!(total > 0)) return 0;
    let cum = 0;
    for (let i = 0; i < sorted.length; i++) {
      cum += sorted[i];
      if (cum / total >= threshold) return sorted[i];
    }
    return (nAll || sorted.length) > sorted.length ? 0 : sorted[sorted.length - 1];
  }

  const FULL = influence(null);
  function prune(nodeThreshold, edgeThreshold) {
    const nodeKeep = new Uint8Array(nN);
    const nodeCut = findThreshold(FULL.infl, nodeThreshold);
    for (let i = 0; i < nN; i++) nodeKeep[i] = cls[i] === 0 || FULL.infl[i] >= nodeCut ? 1 : 0;
    const cand = new Uint8Array(nE);
    for (let e = 0; e < nE; e++) cand[e] = nodeKeep[src[e]] && nodeKeep[dst[e]] ? 1 : 0;
    const P = influence(cand);
    const score = new Float64Array(nE);
    for (let e = 0; e < nE; e++) {
      if (!cand[e]) continue;
      const d = dst[e];
      score[e] = (absw[e] / Math.max(P.rowSum[d], 1e-10)) * (P.infl[d] + (d === TARGET ? 1 : 0));
    }
    const edgeCut = findThreshold(score, edgeThreshold, nN * nN);
    const edgeKeep = new Uint8Array(nE);
    for (let e = 0; e < nE; e++) edgeKeep[e] = cand[e] && score[e] >= edgeCut ? 1 : 0;
    // Drop nodes left without a path: features need an in-edge and an out-edge, errors an out-edge; token
    // embeddings without an out-edge are hidden too (their token stays written under the column).
    const inCnt = new Int32Array(nN), outCnt = new Int32Array(nN);
    for (;;) {
      inCnt.fill(0); outCnt.fill(0);
      for (let e = 0; e < nE; e++) if (edgeKeep[e]) { outCnt[src[e]]++; inCnt[dst[e]]++; }
      let changed = false;
      for (let i = 0; i < nN; i++) {
        if (!nodeKeep[i] || i === TARGET) continue;
        if (outCnt[i] === 0 || (cls[i] === 1 && inCnt[i] === 0)) { nodeKeep[i] = 0; changed = true; }
      }
      if (!changed) break;
      for (let e = 0; e < nE; e++) if (edgeKeep[e] && !(nodeKeep[src[e]] && nodeKeep[dst[e]])) edgeKeep[e] = 0;
    }
    return { nodeKeep, edgeKeep };
  }

  // ------------------------------------------------------------------ state
  const S = {
    nodeT: meta.node_threshold ?? 0.8, edgeT: meta.edge_threshold ?? 0.98, maxEdges: 300,
    kept: null, visible: new Uint8Array(nN), selected: -1, pinned: [], supernodes: [], subgraph: false,
    zoom: 1, rowH: 54, drawn: [], highlighted: [], layout: null, timings: {},
  };
  const headsOf = new Map();
  if (D.heads) D.heads.edge.forEach((e, k) => headsOf.set(e, k));

  // ------------------------------------------------------------------ DOM
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...kids) => {
    const x = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") x.className = v;
      else if (k === "text") x.textContent = v;
      else if (k.startsWith("on")) x.addEventListener(k.slice(2), v);
      else x.setAttribute(k, v);
    }
    for (const c of kids) if (c !== null && c !== undefined) x.append(c);
    return x;
  };
  const SVGNS = "http://www.w3.org/2000/svg";
  const svgEl = (tag, attrs) => {
    const x = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) x.setAttribute(k, v);
    return x;
  };
  const fmt = (x) => (x === null || x === undefined || Number.isNaN(x) ? "n/a" : Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : (+x).toPrecision(3));
  // a token as text: newlines and tabs made visible, everything else as it is
  const showTok = (t) => String(t).replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  const scroller = $("scroller"), content = $("content"), svg = $("nodes"), canvas = $("edges");
  const ctx = canvas.getContext("2d");
  const tip = $("tooltip");

  // ------------------------------------------------------------------ layout
  // a node's slot: 20 px, or 116 px in the subgraph view, where every node carries its label
  const SLOT_PX = 20, LABELLED_SLOT = 116, LEFT = 76, TOP = 24, BOTTOM = 78, R = 7;
  function layout(vis) {
    const SLOT = S.subgraph ? LABELLED_SLOT : SLOT_PX;
    const nPos = TOKENS.length, nRows = ROWS.length;
    const cells = new Map();
    for (let i = 0; i < nN; i++) {
      if (!vis[i]) continue;
      const key = rowOf[i] * nPos + posOf[i];
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(i);
    }
    const busiest = new Int32Array(nPos);
    for (const [key, m] of cells) busiest[key % nPos] = Math.max(busiest[key % nPos], m.length);
    const colX = new Float64Array(nPos + 1), colW = new Float64Array(nPos);
    colX[0] = LEFT;
    for (let p = 0; p < nPos; p++) {
      colW[p] = Math.max(busiest[p] * SLOT, busiest[p] ? 28 : 14);
      colX[p + 1] = colX[p] + colW[p] + 6;
    }
    const x = new Float64Array(nN), y = new Float64Array(nN);
    const kindRank = { embed: 0, pos_embed: 1, attn_feature: 2, mlp_feature: 2, mlp_output: 3, attn_error: 4, mlp_error: 4, target: 5 };
    for (const [key, m] of cells) {
      const p = key % nPos, row = (key - p) / nPos;
      m.sort((a, b) => (kindRank[kindOf[a]] ?? 9) - (kindRank[kindOf[b]] ?? 9) || Math.abs(NODES.attribution[b]) - Math.abs(NODES.attribution[a]) || a - b);
      const x0 = colX[p] + (colW[p] - m.length * SLOT) / 2;
      m.forEach((i, j) => { x[i] = x0 + SLOT * (j + 0.5); y[i] = TOP + (nRows - 1 - row) * S.rowH + S.rowH / 2; });
    }
    return { x, y, colX, colW, width: colX[nPos] + 20, height: TOP + nRows * S.rowH + BOTTOM };
  }

  // ------------------------------------------------------------------ drawing
  const shapes = new Array(nN);
  const COLOURS = { embed: "#8a8a8a", pos_embed: "#b5b83a", attn_feature: "#f08a24", mlp_feature: "#3a9a4a", attn_error: "#9c6b54",
                    mlp_error: "#3aa3b3", mlp_output: "#6b8e23", target: "#8e5cc2" };
  function shapeFor(i) {
    if (shapes[i]) return shapes[i];
    const k = kindOf[i];
    let s;
    if (k === "target") s = svgEl("path", { d: `M0,${-R - 3}L${R + 3},0L0,${R + 3}L${-R - 3},0Z` });
    else if (FEATURE.has(k)) s = svgEl("circle", { r: R });
    else if (TOKEN.has(k)) s = svgEl("rect", { x: -R, y: -R + 2, width: 2 * R, height: 2 * R - 4, rx: 3 });
    else s = svgEl("rect", { x: -R + 1, y: -R + 1, width: 2 * R - 2, height: 2 * R - 2 });
    const g = svgEl("g", { class: "node", "data-id": NODES.id[i] });
    s.setAttribute("fill", COLOURS[k] || "#777");
    s.setAttribute("class", "shape");
    g.append(s);
    g.addEventListener("mouseenter", (ev) => showTip(i, ev));
    g.addEventListener("mousemove", (ev) => moveTip(ev));
    g.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    g.addEventListener("click", (ev) => { ev.stopPropagation(); if (ev.shiftKey) togglePin(i); else select(i); });
    svg.append(g);
    shapes[i] = g;
    return g;
  }

  function computeVisible() {
    const vis = S.visible;
    vis.fill(0);
    if (S.subgraph) {
      for (const i of S.pinned) vis[i] = 1;
    } else {
      for (let i = 0; i < nN; i++) vis[i] = S.kept.nodeKeep[i];
      for (const i of S.pinned) vis[i] = 1;
    }
    if (S.selected >= 0) vis[S.selected] = 1;
  }

  function chooseEdges() {
    const vis = S.visible, kept = S.kept.edgeKeep;
    const pool = [];
    for (let e = 0; e < nE; e++) {
      if (!(vis[src[e]] && vis[dst[e]])) continue;
      // in the subgraph view every edge between pinned nodes; otherwise the kept edges, and the edges of
      // nodes shown beyond the pruning (pinned or selected)
      if (S.subgraph || kept[e] || !S.kept.nodeKeep[src[e]] || !S.kept.nodeKeep[dst[e]]) pool.push(e);
    }
    pool.sort((a, b) => absw[b] - absw[a]);
    const drawn = pool.slice(0, S.maxEdges);
    const hl = [];
    if (S.selected >= 0) {
      const s = S.selected;
      for (const L of [IN, OUT]) for (let k = L.start[s]; k < L.start[s + 1]; k++) {
        const e = L.list[k];
        if (vis[src[e]] && vis[dst[e]]) hl.push(e);
      }
      hl.sort((a, b) => absw[b] - absw[a]);
    }
    S.drawn = drawn;
    S.highlighted = hl;
  }

  function render() {
    computeVisible();
    chooseEdges();
    const L = (S.layout = layout(S.visible));
    const z = S.zoom;
    content.style.width = L.width * z + "px";
    content.style.height = L.height * z + "px";
    svg.setAttribute("width", L.width * z);
    svg.setAttribute("height", L.height * z);
    svg.setAttribute("viewBox", `0 0 ${L.width} ${L.height}`);
    drawAxes(L);
    const hlNodes = new Set();
    for (const e of S.highlighted) { hlNodes.add(src[e]); hlNodes.add(dst[e]); }
    const pinned = new Set(S.pinned);
    for (let i = 0; i < nN; i++) {
      if (!S.visible[i]) { if (shapes[i]) shapes[i].style.display = "none"; continue; }
      const g = shapeFor(i);
      g.style.display = "";
      g.setAttribute("transform", `translate(${L.x[i]},${L.y[i]})`);
      g.classList.toggle("selected", i === S.selected);
      g.classList.toggle("pinned", pinned.has(i));
      g.classList.toggle("dim", S.selected >= 0 && i !== S.selected && !hlNodes.has(i));
      nodeLabel(g, i, S.subgraph);
    }
    drawSupernodes(L);
    drawEdges();
    updateStatus();
    updateQParams();
  }

  function nodeLabel(g, i, on) {
    let t = g.querySelector("text.nlabel");
    if (!on) { if (t) t.remove(); return; }
    if (!t) { t = svgEl("text", { class: "nlabel", y: R + 12, "text-anchor": "middle" }); g.append(t); }
    const full = labelOf[i] || NODES.id[i];
    t.textContent = full.length > 19 ? full.slice(0, 18) + "\u2026" : full;
  }

  let axes = null;
  function drawAxes(L) {
    if (axes) axes.remove();
    axes = svgEl("g", { class: "axes" });
    // text keeps about its screen size when the view is zoomed out a little
    const em = 1 / Math.min(1, Math.max(S.zoom, 0.75));
    axes.setAttribute("font-size", 11 * em);
    const nRows = ROWS.length;
    ROWS.forEach((name, r) => {
      const yy = TOP + (nRows - 1 - r) * S.rowH;
      if (r % 2 === 1) axes.append(svgEl("rect", { x: 0, y: yy, width: L.width, height: S.rowH, class: "band" }));
      const t = svgEl("text", { x: 6, y: yy + S.rowH / 2 + 4, class: "rowlabel" });
      t.textContent = name;
      axes.append(t);
    });
    const yb = TOP + nRows * S.rowH + 14;
    TOKENS.forEach((tok, p) => {
      const cx = L.colX[p] + L.colW[p] / 2;
      const shown = showTok(tok), text = shown.length > 11 ? shown.slice(0, 10) + "\u2026" : shown;
      const t = svgEl("text", { class: "token", x: cx, y: yb, "text-anchor": "end", transform: `rotate(-40 ${cx} ${yb})` });
      t.textContent = text;
      const title = svgEl("title");
      title.textContent = `${p}: ${JSON.stringify(tok)}`;
      t.append(title);
      axes.append(t);
      const n = svgEl("text", { class: "posnum", x: cx, y: TOP - 8, "text-anchor": "middle", "font-size": 9 * em });
      n.textContent = p;
      axes.append(n);
    });
    svg.prepend(axes);
  }

  let hulls = null;
  function drawSupernodes(L) {
    if (hulls) hulls.remove();
    hulls = svgEl("g", { class: "supernodes" });
    for (const sn of S.supernodes) {
      const m = sn.members.filter((i) => S.visible[i]);
      if (!m.length) continue;
      const xs = m.map((i) => L.x[i]), ys = m.map((i) => L.y[i]);
      // the box holds the members and, in the subgraph view, their labels; the name goes under it
      const pad = S.subgraph ? LABELLED_SLOT / 2 - 4 : R + 4;
      const x0 = Math.min(...xs) - pad, x1 = Math.max(...xs) + pad, y0 = Math.min(...ys) - R - 4;
      const y1 = Math.max(...ys) + R + (S.subgraph ? 17 : 4);
      hulls.append(svgEl("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 6, class: "hull" }));
      const t = svgEl("text", { x: x0 + 4, y: y1 + 11, class: "hull-label" });
      t.textContent = sn.name;
      hulls.append(t);
    }
    if (axes && axes.nextSibling) svg.insertBefore(hulls, axes.nextSibling); else svg.append(hulls);
  }

  function drawEdges() {
    const L = S.layout, z = S.zoom, dpr = window.devicePixelRatio || 1;
    const w = scroller.clientWidth, h = scroller.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      canvas.style.width = w + "px"; canvas.style.height = h + "px";
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(dpr * z, 0, 0, dpr * z, -scroller.scrollLeft * dpr, -scroller.scrollTop * dpr);
    const all = S.drawn.concat(S.highlighted);
    let wmax = 1e-30;
    for (const e of all) wmax = Math.max(wmax, absw[e]);
    const selected = S.selected >= 0;
    const line = (e, alpha, extra) => {
      ctx.strokeStyle = wt[e] >= 0 ? `rgba(38,104,186,${alpha})` : `rgba(211,57,75,${alpha})`;
      ctx.lineWidth = (0.4 + 5.6 * (absw[e] / wmax)) * (extra || 1);
      ctx.beginPath();
      const x0 = L.x[src[e]], y0 = L.y[src[e]], x1 = L.x[dst[e]], y1 = L.y[dst[e]];
      ctx.moveTo(x0, y0);
      ctx.bezierCurveTo(x0, (y0 + y1) / 2, x1, (y0 + y1) / 2, x1, y1);
      ctx.stroke();
    };
    for (const e of S.drawn) line(e, selected ? 0.08 : 0.45);
    if (selected) {
      for (const e of S.highlighted) line(e, 0.85, 1.2);
      ctx.font = "10px sans-serif";
      ctx.textAlign = "center";
      const s = S.selected;
      const placed = [];
      for (const e of S.highlighted.slice(0, 40)) {
        const other = src[e] === s ? dst[e] : src[e];
        const text = (wt[e] >= 0 ? "+" : "") + fmt(wt[e]);
        const tx = L.x[other], ty = L.y[other] - R - 5, half = ctx.measureText(text).width / 2 + 2;
        // label the strongest edges first and skip a label that would cover one already written
        if (placed.some(([x, y, h]) => Math.abs(x - tx) < h + half && Math.abs(y - ty) < 11)) continue;
        placed.push([tx, ty, half]);
        ctx.lineWidth = 3; ctx.strokeStyle = "rgba(255,255,255,0.9)";
        ctx.strokeText(text, tx, ty);
        ctx.fillStyle = wt[e] >= 0 ? "#1d4f8f" : "#a3293a";
        ctx.fillText(text, tx, ty);
      }
    }
  }

  // ------------------------------------------------------------------ tooltip and status
  function showTip(i, ev) {
    tip.innerHTML = "";
    tip.append(el("div", { class: "tip-label", text: labelOf[i] || NODES.id[i] }),
      el("div", { class: "tip-id", text: `${NODES.id[i]} (${kindOf[i]}) at ${posOf[i]}: ${showTok(TOKENS[posOf[i]] ?? "")}` }),
      el("div", { text: `activation ${fmt(NODES.activation[i])}` }),
      el("div", { text: `attribution to the target ${fmt(NODES.attribution[i])}` }),
      el("div", { text: `influence ${fmt(FULL.infl[i])}` }));
    tip.style.display = "block";
    moveTip(ev);
  }
  function moveTip(ev) {
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = x + "px";
    tip.style.top = ev.clientY + 14 + "px";
  }
  function updateStatus() {
    let nk = 0, ek = 0;
    for (let i = 0; i < nN; i++) nk += S.kept.nodeKeep[i];
    for (let e = 0; e < nE; e++) ek += S.kept.edgeKeep[e];
    let nv = 0;
    for (let i = 0; i < nN; i++) nv += S.visible[i];
    const carried = meta.n_edges_total && meta.n_edges_total > nE ? ` (the file's strongest ${nE} of ${meta.n_edges_total})` : "";
    $("status").textContent = `${nv} of ${nN} nodes shown (${nk} kept by pruning), ${ek} of ${nE} edges kept${carried}, ` +
      `${S.drawn.length} strongest drawn` + (S.subgraph ? "; subgraph view" : "");
  }

  // ------------------------------------------------------------------ the side panel
  function nodeName(i) { return labelOf[i] && labelOf[i] !== NODES.id[i] ? `${labelOf[i]}` : NODES.id[i]; }
  function link(i) {
    return el("a", { href: "#", class: "nodelink", title: NODES.id[i], onclick: (ev) => { ev.preventDefault(); select(i); } }, NODES.id[i]);
  }
  function weightCell(x) { return el("span", { class: x >= 0 ? "pos" : "neg", text: (x >= 0 ? "+" : "") + fmt(x) }); }
  function kindText(i) {
    const k = kindOf[i], layer = NODES.layer[i], p = posOf[i], tok = JSON.stringify(TOKENS[p] ?? "");
    if (k === "embed") return `Token embedding of ${tok} at position ${p}.`;
    if (k === "pos_embed") return `Position embedding of position ${p} (token ${tok}).`;
    if (k === "attn_error") return `Attention layer ${layer} error at position ${p}: the part of the attention output that the SAE does not reconstruct, frozen.`;
    if (k === "mlp_error") return `MLP layer ${layer} error at position ${p}: the part of the MLP output that the transcoder does not reconstruct, frozen.`;
    if (k === "mlp_output") return `MLP layer ${layer} output at position ${p}, frozen as one node: this layer has no transcoder.`;
    if (k === "target") return `The target ${meta.target ?? ""} = ${fmt(meta.target_value)}.`;
    return null;
  }

  function renderCard(card) {
    const box = el("div", { class: "card" });
    box.append(el("h3", { text: card.title || "" }));
    if (card.label) box.append(el("div", { class: "card-label", text: card.label }));
    if (card.contexts && card.contexts.length) {
      box.append(el("h4", { text: "Top activating contexts" }));
      const amax = Math.max(1e-30, ...card.contexts.map((c) => Math.abs(c.activation)));
      for (const c of card.contexts.slice(0, 10)) {
        const row = el("div", { class: "context" });
        c.tokens.forEach((t, j) => {
          const span = el("span", { class: j === c.index ? "tok hot" : "tok", text: showTok(t) });
          if (j === c.index) span.style.background = `rgba(240,138,36,${0.25 + 0.6 * Math.abs(c.activation) / amax})`;
          row.append(span);
        });
        row.append(el("span", { class: "ctx-act", text: fmt(c.activation) }));
        box.append(row);
      }
    }
    if ((card.top_logits && card.top_logits.length) || (card.bottom_logits && card.bottom_logits.length)) {
      const t = el("div", { class: "logits" });
      for (const [name, list] of [["Top logits", card.top_logits || []], ["Bottom logits", card.bottom_logits || []]]) {
        const col = el("div", {}, el("h4", { text: name }));
        for (const [tok, v] of list.slice(0, 8)) col.append(el("div", { class: "logit" }, el("code", { text: showTok(tok) }), " ", weightCell(v)));
        t.append(col);
      }
      box.append(t);
    }
    if (card.histogram && card.histogram.counts && card.histogram.counts.length) {
      box.append(el("h4", { text: "Activation histogram" }));
      box.append(histogram(card.histogram));
    }
    if (card.scorecard) {
      box.append(el("h4", { text: "Scorecard" }));
      const tb = el("table", { class: "scorecard" });
      for (const [k, v] of Object.entries(card.scorecard)) tb.append(el("tr", {}, el("td", { text: k }), el("td", { text: fmt(v) })));
      box.append(tb);
    }
    if (card.dashboard) box.append(el("div", {}, el("a", { href: card.dashboard, target: "_blank", text: "full dashboard" })));
    return box;
  }

  function histogram(h) {
    const W = 340, H = 70, n = h.counts.length, cmax = Math.max(1, ...h.counts);
    const s = svgEl("svg", { width: W, height: H + 14, class: "hist" });
    h.counts.forEach((c, j) => {
      const bh = (H * c) / cmax;
      s.append(svgEl("rect", { x: (W * j) / n, y: H - bh, width: Math.max(1, W / n - 1), height: bh }));
    });
    const lo = svgEl("text", { x: 0, y: H + 12 }), hi = svgEl("text", { x: W, y: H + 12, "text-anchor": "end" });
    lo.textContent = fmt(h.edges[0]); hi.textContent = fmt(h.edges[h.edges.length - 1]);
    s.append(lo, hi);
    return s;
  }

  function edgeTable(title, list, s) {
    const box = el("div", { class: "edges" }, el("h4", { text: `${title} (${list.length})` }));
    const tb = el("table");
    for (const e of list.slice(0, 40)) {
      const other = src[e] === s ? dst[e] : src[e];
      const row = el("tr", {}, el("td", {}, weightCell(wt[e])), el("td", {}, link(other)), el("td", { class: "lbl", text: labelOf[other] !== NODES.id[other] ? labelOf[other] : "" }));
      const h = headsOf.get(e);
      if (h !== undefined) row.append(headSplit(D.heads.weights[h], D.heads.src_pos[h]));
      tb.append(row);
    }
    box.append(tb);
    if (list.length > 40) box.append(el("div", { class: "note", text: `and ${list.length - 40} more` }));
    return box;
  }

  // One edge into an attention feature: its largest head's share, the whole split on hover.
  function headSplit(ws, sp) {
    let top = 0, total = 0;
    ws.forEach((x, j) => { total += Math.abs(x); if (Math.abs(x) > Math.abs(ws[top])) top = j; });
    const share = total > 0 ? Math.round((100 * Math.abs(ws[top])) / total) : 0;
    return el("td", { class: "hsplit", title: `from position ${sp}: ` + ws.map((x, j) => `h${j} ${fmt(x)}`).join(", "), text: `h${top} ${share}%` });
  }

  // Split of the in-edges of an attention feature by head and source position (sums of the per-head parts).
  function headTable(i) {
    if (!D.heads) return null;
    const parts = new Map();
    let nHeads = 0;
    for (let k = IN.start[i]; k < IN.start[i + 1]; k++) {
      const e = IN.list[k], h = headsOf.get(e);
      if (h === undefined) continue;
      const ws = D.heads.weights[h], sp = D.heads.src_pos[h];
      nHeads = Math.max(nHeads, ws.length);
      if (!parts.has(sp)) parts.set(sp, new Float64Array(ws.length));
      const acc = parts.get(sp);
      ws.forEach((x, j) => { acc[j] += x; });
    }
    if (!parts.size) return null;
    let vmax = 1e-30;
    for (const a of parts.values()) for (const x of a) vmax = Math.max(vmax, Math.abs(x));
    // one row per source position, one column per head; positions whose parts are all under 1% of the
    // largest are summed in a last row
    const all = [...parts.keys()].sort((a, b) => a - b);
    const big = all.filter((p) => parts.get(p).some((x) => Math.abs(x) >= 0.01 * vmax));
    const rest = new Float64Array(nHeads);
    for (const p of all) if (!big.includes(p)) parts.get(p).forEach((x, h) => { rest[h] += x; });
    const cell = (x) => {
      const td = el("td", { text: fmt(x) });
      td.style.background = x >= 0 ? `rgba(38,104,186,${Math.min(1, Math.abs(x) / vmax) * 0.6})` : `rgba(211,57,75,${Math.min(1, Math.abs(x) / vmax) * 0.6})`;
      return td;
    };
    const tb = el("table", { class: "grid" });
    tb.append(el("tr", {}, el("th", { text: "source \\ head" }), ...Array.from({ length: nHeads }, (_, h) => el("th", { text: `h${h}` }))));
    for (const p of big)
      tb.append(el("tr", {}, el("th", { title: JSON.stringify(TOKENS[p]), text: `${p} ${showTok(TOKENS[p] ?? "").slice(0, 10)}` }), ...Array.from(parts.get(p), cell)));
    if (big.length < all.length)
      tb.append(el("tr", {}, el("th", { text: `${all.length - big.length} others` }), ...Array.from(rest, cell)));
    return el("div", { class: "heads" }, el("h4", { text: "In-edges by head and source position" }), tb);
  }

  function qkTable() {
    const q = D.qk;
    const box = el("div", { class: "qk" }, el("h4", { text: `Attention score ${fmt(q.score)}: query x key pairs` }));
    const K = 12;
    const top = (m) => m.map((x, j) => j).sort((a, b) => Math.abs(m[b]) - Math.abs(m[a])).slice(0, K);
    const qi = top(q.query_marginal), ki = top(q.key_marginal);
    const name = (id) => (byId.has(id) ? id : id);
    const tb = el("table", { class: "grid" });
    tb.append(el("tr", {}, el("th", { text: "query \\ key" }), ...ki.map((k) => el("th", { class: "rot", text: name(q.key_nodes[k]) })), el("th", { text: "query marginal" })));
    let vmax = 1e-30;
    for (const a of qi) for (const b of ki) vmax = Math.max(vmax, Math.abs(q.pairs[a][b]));
    for (const a of qi) {
      tb.append(el("tr", {}, el("th", { text: name(q.query_nodes[a]) }), ...ki.map((b) => {
        const x = q.pairs[a][b], td = el("td", { text: fmt(x) });
        td.style.background = x >= 0 ? `rgba(38,104,186,${Math.abs(x) / vmax * 0.6})` : `rgba(211,57,75,${Math.abs(x) / vmax * 0.6})`;
        return td;
      }), el("td", { class: "marg", text: fmt(q.query_marginal[a]) })));
    }
    tb.append(el("tr", {}, el("th", { text: "key marginal" }), ...ki.map((b) => el("td", { class: "marg", text: fmt(q.key_marginal[b]) })), el("td")));
    box.append(tb);
    if (q.query_nodes.length > K || q.key_nodes.length > K)
      box.append(el("div", { class: "note", text: `the ${K} largest of ${q.query_nodes.length} query and ${q.key_nodes.length} key terms by |marginal|` }));
    return box;
  }

  function renderPanel() {
    const P = $("node-panel");
    P.innerHTML = "";
    const i = S.selected;
    if (i < 0) { P.append(el("div", { class: "note", text: "Click a node to see its card and its edges. Shift-click pins it." })); return; }
    P.append(el("h2", { text: nodeName(i) }));
    P.append(el("div", { class: "ids", text: `${NODES.id[i]} · ${kindOf[i]} · position ${posOf[i]} ${JSON.stringify(TOKENS[posOf[i]] ?? "")}` }));
    const facts = el("table", { class: "facts" });
    for (const [k, v] of [["activation", NODES.activation[i]], ["attribution to the target", NODES.attribution[i]], ["influence", FULL.infl[i]]])
      facts.append(el("tr", {}, el("td", { text: k }), el("td", { text: fmt(v) })));
    P.append(facts);
    P.append(el("button", { text: S.pinned.includes(i) ? "unpin" : "pin", onclick: () => togglePin(i) }));
    const what = kindText(i);
    if (what) P.append(el("p", { class: "what", text: what }));
    const key = NODES.card ? NODES.card[i] : null;
    if (key && cards[key]) P.append(renderCard(cards[key]));
    else if (FEATURE.has(kindOf[i])) P.append(el("p", { class: "note", text: `No card for this feature: ${meta.cards_note || "none was made"}.` }));
    if (kindOf[i] === "target" && D.qk) P.append(qkTable());
    if (kindOf[i] === "attn_feature") { const t = headTable(i); if (t) P.append(t); }
    const ins = S.highlighted.filter((e) => dst[e] === i), outs = S.highlighted.filter((e) => src[e] === i);
    P.append(edgeTable("In-edges from shown nodes", ins, i), edgeTable("Out-edges to shown nodes", outs, i));
  }

  // ------------------------------------------------------------------ actions
  function idx(id) {
    if (typeof id === "number") return id;
    if (!byId.has(id)) throw new Error(`no node ${JSON.stringify(id)} in this circuit`);
    return byId.get(id);
  }
  function select(i) {
    S.selected = i === null || i === undefined ? -1 : idx(i);
    render();
    renderPanel();
  }
  function togglePin(i) {
    const k = S.pinned.indexOf(i);
    if (k >= 0) { S.pinned.splice(k, 1); for (const sn of S.supernodes) sn.members = sn.members.filter((m) => m !== i); }
    else S.pinned.push(i);
    S.supernodes = S.supernodes.filter((sn) => sn.members.length);
    render(); renderPanel(); renderPins();
  }
  function pin(ids) {
    for (const id of ids) { const i = idx(id); if (!S.pinned.includes(i)) S.pinned.push(i); }
    render(); renderPins();
    return S.pinned.map((i) => NODES.id[i]);
  }
  function unpin(ids) { for (const id of ids) { const i = idx(id); if (S.pinned.includes(i)) togglePin(i); } }
  function supernode(name, ids) {
    if (!name) throw new Error("a supernode needs a name");
    const members = ids.map(idx);
    for (const i of members) if (!S.pinned.includes(i)) S.pinned.push(i);
    for (const sn of S.supernodes) sn.members = sn.members.filter((m) => !members.includes(m));
    S.supernodes = S.supernodes.filter((sn) => sn.members.length && sn.name !== name);
    S.supernodes.push({ name, members });
    render(); renderPins();
    return qParams();
  }
  function qParams() {
    return {
      pinnedIds: S.pinned.map((i) => npId[i]),
      supernodes: S.supernodes.map((sn) => [sn.name, ...sn.members.map((i) => npId[i])]),
      linkType: "both",
      clickedId: S.selected >= 0 ? npId[S.selected] : "",
      sg_pos: "",
    };
  }
  function setThresholds(node, edge) {
    const t = performance.now();
    S.nodeT = +node; S.edgeT = +edge;
    S.kept = prune(S.nodeT, S.edgeT);
    $("node-t").value = S.nodeT; $("edge-t").value = S.edgeT;
    $("node-t-v").textContent = S.nodeT.toFixed(2); $("edge-t-v").textContent = S.edgeT.toFixed(3);
    render();
    if (S.selected >= 0) renderPanel();
    S.timings.threshold_ms = performance.now() - t;
    return { nodes: visibleNodes().length, edges: S.kept.edgeKeep.reduce((a, b) => a + b, 0) };
  }
  function visibleNodes() { const out = []; for (let i = 0; i < nN; i++) if (S.visible[i]) out.push(NODES.id[i]); return out; }
  function search(q) {
    q = (q || "").toLowerCase().trim();
    if (!q) return [];
    const out = [];
    for (let i = 0; i < nN && out.length < 50; i++)
      if (NODES.id[i].toLowerCase().includes(q) || (labelOf[i] || "").toLowerCase().includes(q)) out.push(NODES.id[i]);
    return out;
  }
  function setZoom(z) {
    S.zoom = Math.max(0.2, Math.min(4, z));
    render();
  }
  // Fit the width, then give the rows the height that is left (between 40 and 110 px a row).
  function fitZoom() {
    S.rowH = 54;
    const L = layout(S.visible), zw = Math.min(1.6, (scroller.clientWidth - 12) / L.width);
    const fill = ((scroller.clientHeight - 12) / Math.max(zw, 0.3) - (L.height - ROWS.length * S.rowH)) / ROWS.length;
    S.rowH = Math.max(40, Math.min(110, fill));
    const L2 = layout(S.visible);
    return Math.min(1.6, Math.max(0.3, Math.min((scroller.clientWidth - 12) / L2.width, (scroller.clientHeight - 12) / L2.height)));
  }
  function fit() { setZoom(fitZoom()); }

  function renderPins() {
    const box = $("pins");
    box.innerHTML = "";
    for (const i of S.pinned) {
      const sn = S.supernodes.find((s) => s.members.includes(i));
      box.append(el("div", { class: "pin" }, link(i), sn ? el("span", { class: "sn", text: ` [${sn.name}]` }) : null,
        el("button", { class: "x", text: "×", title: "unpin", onclick: () => togglePin(i) })));
    }
    updateQParams();
  }
  function updateQParams() { $("qparams").value = JSON.stringify(qParams()); }

  // ------------------------------------------------------------------ wiring
  function header() {
    const sc = meta.scores || {};
    $("title").textContent = `${meta.model ?? ""}: ${meta.target ?? "target"} = ${fmt(meta.target_value)}`;
    $("prompt").textContent = JSON.stringify(meta.prompt ?? "");
    $("scores").textContent = Object.entries(sc).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") +
      (meta.max_relative_residual !== undefined ? ` · max relative residual ${fmt(meta.max_relative_residual)}` : "");
    if (meta.cards_note) $("cards-note").textContent = meta.cards_note;
  }
  $("node-t").addEventListener("input", (ev) => setThresholds(ev.target.value, S.edgeT));
  $("edge-t").addEventListener("input", (ev) => setThresholds(S.nodeT, ev.target.value));
  $("max-edges").addEventListener("input", (ev) => { S.maxEdges = +ev.target.value; $("max-edges-v").textContent = S.maxEdges; render(); });
  $("subgraph").addEventListener("change", (ev) => { S.subgraph = ev.target.checked; render(); });
  $("pin-selected").addEventListener("click", () => { if (S.selected >= 0) togglePin(S.selected); });
  $("clear-pins").addEventListener("click", () => { S.pinned = []; S.supernodes = []; render(); renderPins(); renderPanel(); });
  $("group").addEventListener("click", () => {
    const free = S.pinned.filter((i) => !S.supernodes.some((sn) => sn.members.includes(i)));
    const name = $("sn-name").value.trim() || `group ${S.supernodes.length + 1}`;
    if (free.length) supernode(name, free);
    $("sn-name").value = "";
  });
  $("copy").addEventListener("click", () => { $("qparams").select(); document.execCommand && document.execCommand("copy"); });
  $("zoom-in").addEventListener("click", () => setZoom(S.zoom * 1.25));
  $("zoom-out").addEventListener("click", () => setZoom(S.zoom / 1.25));
  $("zoom-fit").addEventListener("click", fit);
  $("search").addEventListener("input", (ev) => {
    const box = $("results");
    box.innerHTML = "";
    for (const id of search(ev.target.value).slice(0, 20)) {
      const i = byId.get(id);
      box.append(el("div", { class: "result" }, link(i), el("span", { class: "lbl", text: " " + (labelOf[i] !== id ? labelOf[i] : "") })));
    }
  });
  $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { const r = search(ev.target.value); if (r.length) select(r[0]); } });
  scroller.addEventListener("scroll", () => drawEdges());
  scroller.addEventListener("click", () => { if (S.selected >= 0) select(null); });
  scroller.addEventListener("wheel", (ev) => { if (ev.ctrlKey) { ev.preventDefault(); setZoom(S.zoom * (ev.deltaY < 0 ? 1.1 : 1 / 1.1)); } }, { passive: false });
  window.addEventListener("resize", () => drawEdges());
  window.addEventListener("keydown", (ev) => { if (ev.key === "Escape") select(null); });

  header();
  $("max-edges").value = S.maxEdges; $("max-edges-v").textContent = S.maxEdges;
  S.kept = prune(S.nodeT, S.edgeT);
  $("node-t").value = S.nodeT; $("edge-t").value = S.edgeT;
  $("node-t-v").textContent = S.nodeT.toFixed(2); $("edge-t-v").textContent = S.edgeT.toFixed(3);
  computeVisible();
  S.zoom = fitZoom();
  render();
  renderPanel();
  renderPins();
  S.timings.open_ms = performance.now() - T0;

  window.explorer = {
    visibleNodes,
    keptNodes: () => NODES.id.filter((_, i) => S.kept.nodeKeep[i]),
    keptEdges: () => { const out = []; for (let e = 0; e < nE; e++) if (S.kept.edgeKeep[e]) out.push([NODES.id[src[e]], NODES.id[dst[e]]]); return out; },
    select: (id) => { select(id); return S.selected >= 0 ? NODES.id[S.selected] : null; },
    selected: () => (S.selected >= 0 ? NODES.id[S.selected] : null),
    panel: () => $("node-panel").innerText,
    setThresholds,
    thresholds: () => ({ node: S.nodeT, edge: S.edgeT }),
    setMaxEdges: (n) => { S.maxEdges = n; $("max-edges").value = n; $("max-edges-v").textContent = n; render(); },
    pin, unpin, supernode, qParams, search,
    pinned: () => S.pinned.map((i) => NODES.id[i]),
    setSubgraph: (on) => { S.subgraph = !!on; $("subgraph").checked = S.subgraph; render(); },
    highlightedEdges: () => S.highlighted.map((e) => [NODES.id[src[e]], NODES.id[dst[e]], wt[e]]),
    drawnEdges: () => S.drawn.map((e) => [NODES.id[src[e]], NODES.id[dst[e]], wt[e]]),
    nodeBoxes: () => visibleNodes().map((id) => {
      const r = shapes[byId.get(id)].getBoundingClientRect();
      return { id, x: r.x, y: r.y, width: r.width, height: r.height };
    }),
    influence: () => Object.fromEntries(NODES.id.map((id, i) => [id, FULL.infl[i]])),
    setZoom, fit,
    timings: () => ({ ...S.timings }),
  };
  document.body.dataset.ready = "1";
})();
