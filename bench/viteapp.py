"""A generated Vite app shaped like a real front end: hundreds of ES modules in an import tree many levels
deep, each a kilobyte or two, plus one self-accepting module that HMR rounds rewrite.

The page reports when it is on screen: ``window.__painted`` is ``performance.now()`` two animation frames after
the root module ran (every import resolved, the text set, a frame painted), and ``hmr.js`` stamps
``window.__hmr = {text, at}`` (``Date.now()``) each time it runs, so an edit's arrival is timed in the page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LEVELS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 128, 160, 162)
"""Modules per level of the import tree: 801 modules, 12 levels (13 with main.js)."""
_FILLER = "".join(f"  [{i}, \"{'abcdefghij' * 3}\", {i * 7 % 13}],\n" for i in range(24))
"""About a kilobyte of table per module: the size of a small component's source."""
INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>bench app</title></head>
<body style="font: 18px sans-serif">
<h1 id="app">loading</h1>
<p id="hmr"></p>
<script type="module" src="/main.js"></script>
</body></html>
"""
MAIN = """import { value } from "./src/l0_0.js";
import "./hmr.js";
document.getElementById("app").textContent = `modules: ${value}`;
requestAnimationFrame(() => requestAnimationFrame(() => { window.__painted = performance.now(); }));
"""


@dataclass(frozen=True)
class App:
    root: Path
    modules: int
    depth: int
    expected: str
    """The page's text once every module ran."""

    def write_hmr(self, text: str) -> None:
        """Rewrite the self-accepting module: Vite pushes the edit and the page runs it again."""
        (self.root / "hmr.js").write_text(hmr_source(text))


def hmr_source(text: str) -> str:
    return (f"const text = {json.dumps(text)};\n"
            "document.getElementById('hmr').textContent = text;\n"
            "window.__hmr = { text, at: Date.now() };\n"
            "if (import.meta.hot) import.meta.hot.accept();\n")


def _module(level: int, index: int, children: list[int]) -> str:
    imports = "".join(f'import {{ value as c{child} }} from "./l{level + 1}_{child}.js";\n' for child in children)
    total = " + ".join(["1", *(f"c{child}" for child in children)])
    return (f"{imports}const rows = [\n{_FILLER}];\n"
            f"export const table_{level}_{index} = rows.map(([n, s, m]) => n + s.length + m);\n"
            f"export const value = {total};\n")


def generate(root: Path, levels: tuple[int, ...] = LEVELS) -> App:
    """Write the app under ``root``: module ``k`` of level ``L + 1`` is imported by module ``k % size(L)`` of
    level ``L``, so every module is reached and the tree is ``len(levels)`` deep below ``main.js``."""
    src = root / "src"
    src.mkdir(parents=True)
    for level, size in enumerate(levels):
        below = levels[level + 1] if level + 1 < len(levels) else 0
        for index in range(size):
            children = [child for child in range(below) if child % size == index]
            (src / f"l{level}_{index}.js").write_text(_module(level, index, children))
    (root / "index.html").write_text(INDEX)
    (root / "main.js").write_text(MAIN)
    app = App(root, modules=sum(levels) + 2, depth=len(levels) + 1, expected=f"modules: {sum(levels)}")
    app.write_hmr("hmr 0")
    return app
