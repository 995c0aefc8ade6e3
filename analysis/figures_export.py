"""Write a plotly figure as an offline HTML page (plotly.js inline) and as a PNG for the README.

PNG export: plotly's own ``write_image`` needs kaleido, which this project does not depend on. When kaleido is
not importable we render the figure's page in headless Chromium (Debian's ``chromium``) and take a screenshot,
so a PNG needs either kaleido or a ``chromium`` binary on the PATH.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from saes.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@dataclass(frozen=True)
class FigureFiles:
    html: Path
    png: Path | None


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _png_with_kaleido(fig, width: int, height: int) -> bytes | None:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None
    return fig.to_image(format="png", width=width, height=height)


def _png_with_chromium(fig, width: int, height: int, chromium: str, timeout_s: float = 120) -> bytes:
    """Screenshot a static copy of the page, sized exactly to the window, in a throw-away browser profile."""
    with tempfile.TemporaryDirectory(prefix="figure-png-") as tmp:
        tmp = Path(tmp)
        static = fig.to_dict()
        static["layout"] = {**static.get("layout", {}), "width": width, "height": height}
        import plotly.graph_objects as go

        page = go.Figure(static).to_html(include_plotlyjs=True, full_html=True,
                                         config={"staticPlot": True, "displayModeBar": False})
        page = page.replace("<head>", "<head><style>body{margin:0;overflow:hidden}</style>", 1)
        (tmp / "page.html").write_text(page, encoding="utf-8")
        out = tmp / "shot.png"
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp / 'profile'}", f"--screenshot={out}", f"--window-size={width},{height}",
               "--virtual-time-budget=5000", (tmp / "page.html").as_uri()]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
        if not out.is_file():
            raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.decode()[-500:]}")
        return out.read_bytes()


def save_figure(fig, path_stem: Path, png: bool = True, width: int = 1000, height: int = 700) -> FigureFiles:
    """Write ``path_stem.html`` (works offline) and, if ``png``, ``path_stem.png``; returns the paths written."""
    path_stem = Path(path_stem)
    html = path_stem.with_suffix(".html")
    atomic_write_text(html, fig.to_html(include_plotlyjs=True, full_html=True))
    if not png:
        return FigureFiles(html, None)
    data = _png_with_kaleido(fig, width, height)
    if data is None:
        chromium = find_chromium()
        if chromium is None:
            raise RuntimeError("a PNG needs kaleido or a chromium binary on the PATH; install one, or pass png=False (--no-png)")
        data = _png_with_chromium(fig, width, height, chromium)
    target = path_stem.with_suffix(".png")
    atomic_write_bytes(target, data)
    log.info("wrote %s and %s", html, target)
    return FigureFiles(html, target)
