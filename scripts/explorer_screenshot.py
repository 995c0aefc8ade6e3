"""A PNG of an explorer page (``graph.html``) with one node selected, taken in Debian's chromium.

1. Open the page in chromium (Playwright's Python package, ``executable_path`` = ``chromium`` on the PATH), with
   every request other than the page's own file aborted.
2. Optionally set the thresholds, select a node (by default the feature with the largest |attribution| among
   those shown) and pin nodes, all through ``window.explorer``.
3. Save a screenshot of the viewport.

    python -m scripts.explorer_screenshot out/demo/graph.html --out docs/img/explorer.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

PICK_FEATURE = """() => {
  const d = JSON.parse(document.getElementById("circuit-data").textContent), n = d.nodes;
  const shown = new Set(explorer.visibleNodes());
  let best = null, bestA = -1;
  n.id.forEach((id, i) => {
    if (shown.has(id) && (n.kind[i] === "attn_feature" || n.kind[i] === "mlp_feature") && Math.abs(n.attribution[i]) > bestA) {
      best = id; bestA = Math.abs(n.attribution[i]);
    }
  });
  return best;
}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path, help="an explorer page (graph.html)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--select", default=None, help="node id to select (default: the shown feature with the largest |attribution|)")
    p.add_argument("--thresholds", type=float, nargs=2, metavar=("NODE", "EDGE"), default=None)
    p.add_argument("--pin", nargs="*", default=[], help="node ids to pin")
    p.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"), default=(1500, 860))
    args = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("error: chromium is not on the PATH; install Debian's chromium package")
    if not args.page.is_file():
        sys.exit(f"error: no page at {args.page}; write one with `circuits trace`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("error: Playwright's Python package is missing; `make setup` installs it")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": args.size[0], "height": args.size[1]}, device_scale_factor=1)
        context.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
        page = context.new_page()
        page.goto(args.page.resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']")
        if args.thresholds:
            page.evaluate("([n, e]) => explorer.setThresholds(n, e)", args.thresholds)
        if args.pin:
            page.evaluate("ids => explorer.pin(ids)", args.pin)
        node = args.select or page.evaluate(PICK_FEATURE)
        if node:
            page.evaluate("id => explorer.select(id)", node)
        png = page.screenshot()
        shown = len(page.evaluate("explorer.visibleNodes()"))
        browser.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, args.out)
    print(json.dumps({"page": str(args.page), "png": str(args.out), "selected": node, "nodes_shown": shown}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
