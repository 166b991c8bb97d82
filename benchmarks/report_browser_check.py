"""The HTML report as a browser shows it: headless Chromium loads ``report.html``, every image
must have loaded (a decoded size above zero), every results table must be there with its rows,
the page must not scroll sideways (wide tables scroll inside their own box), and every figure
file the page links to must exist and decode. Then a full-page screenshot is saved.

PATH is a results folder (with ``results.sqlite``: the report is written first, into --out or
the folder itself) or a folder that already holds a ``report.html``.

    apt-get install chromium            # Debian's package; the check needs the `chromium` command
    tsbd bench benchmarks/report_demo.toml --results /tmp/report-demo --threads 1
    python3 benchmarks/report_browser_check.py /tmp/report-demo --out docs/results/report-demo \
        --screenshot docs/results/report-demo/report.png

Chromium runs the page with a small script appended to a temporary copy of it (in the same
folder, so relative links resolve; removed afterwards) that writes what it measured into the
DOM, which ``--dump-dom`` prints. Exit status 0: every check passed; 1: a check failed (each
failure on its own line); 2: no Chromium or no report.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from tsbd.bench.report import HTML_NAME, write_report
from tsbd.bench.store import DB_NAME

WIDTH = 1280  # px: a laptop screen
MAX_HEIGHT = 20000  # px: the screenshot's limit
MARKER = "data-report-check"
# appended to the copy: measures once everything (the embedded images included) has loaded
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map((img, i) => ({index: i, alt: img.alt, complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight, shown: img.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table.results")].map(t => ({
    rows: t.tBodies.length ? t.tBodies[0].rows.length : 0, height: t.getBoundingClientRect().height}));
  document.body.setAttribute("MARKER", JSON.stringify({images, tables,
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    height: document.documentElement.scrollHeight}));
});
</script>""".replace("MARKER", MARKER)


class Source(HTMLParser):
    """What the report's source promises: its images, results tables, table rows and linked files."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.links, self.sections = 0, 0, [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images += 1
        elif tag == "table" and a.get("class") == "results":
            self.tables += 1
        elif tag == "a" and a.get("href") and not re.match(r"[a-z]+:", a["href"]):
            self.links.append(a["href"])
        elif tag == "h2" and (a.get("id") or "").startswith("t"):
            self.sections += 1


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def run_chromium(binary: str, args: list[str], timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory(prefix="report-check-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               "--no-first-run", f"--user-data-dir={profile}", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def measure(binary: str, page: Path) -> dict:
    """Load ``page`` (with the probe appended to a temporary copy) and return what the probe saw."""
    text = page.read_text()
    probe_page = page.with_name(f".{page.stem}.check.html")
    probe_page.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE)
    try:
        dom = run_chromium(binary, [f"--window-size={WIDTH},900", "--virtual-time-budget=15000", "--dump-dom",
                                    probe_page.resolve().as_uri()])
    finally:
        probe_page.unlink(missing_ok=True)
    found = re.search(MARKER + r'="([^"]*)"', dom)
    if not found:
        raise RuntimeError("the page's load event never ran the probe (is the page broken?)")
    return json.loads(html.unescape(found.group(1)))


def check(folder: Path, seen: dict, source: Source) -> list[str]:
    problems = []
    if len(seen["images"]) != source.images:
        problems.append(f"{source.images} <img> in the source, {len(seen['images'])} in the page")
    for img in seen["images"]:
        if not img["complete"] or img["width"] == 0 or img["height"] == 0:
            problems.append(f"image {img['index']} ({img['alt']!r}) did not load")
        elif img["shown"] < 200:
            problems.append(f"image {img['index']} ({img['alt']!r}) is shown only {img['shown']:.0f} px wide")
    if not source.tables or len(seen["tables"]) != source.tables or source.tables != source.sections:
        problems.append(f"{source.sections} table sections, {source.tables} results tables in the source, "
                        f"{len(seen['tables'])} in the page")
    for i, t in enumerate(seen["tables"]):
        if t["rows"] < 2 or t["height"] <= 0:  # at least one attack and the average row
            problems.append(f"results table {i + 1} shows {t['rows']} rows, {t['height']:.0f} px high")
    if seen["scrollWidth"] > seen["innerWidth"]:
        problems.append(f"the page scrolls sideways: {seen['scrollWidth']} px wide in a {seen['innerWidth']} px window")
    for link in source.links:
        target = folder / link
        if not target.is_file():
            problems.append(f"linked file {link} is missing")
        elif target.suffix == ".png":
            try:
                with Image.open(target) as im:
                    im.verify()
            except Exception as e:  # any decoder error is the finding
                problems.append(f"linked file {link} does not decode: {e}")
        elif target.suffix == ".svg" and b"<svg" not in target.read_bytes()[:2000]:
            problems.append(f"linked file {link} is not an SVG")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a results folder (report written first) or a folder with report.html")
    ap.add_argument("--out", type=Path, help="where to write the report of a results folder (default: the folder)")
    ap.add_argument("--grid", help="report only this grid of the results folder")
    ap.add_argument("--screenshot", type=Path, help="the full-page screenshot (default: OUT/report.png)")
    args = ap.parse_args(argv)

    binary = chromium()
    if binary is None:
        print("report_browser_check: error: no chromium on PATH; install Debian's package: apt-get install chromium",
              file=sys.stderr)
        return 2
    folder = args.out or args.path
    if (args.path / DB_NAME).is_file():
        write_report(args.path, out_dir=folder, grid=args.grid)
    page = folder / HTML_NAME
    if not page.is_file():
        print(f"report_browser_check: error: no {HTML_NAME} in {folder} and no results store in {args.path}",
              file=sys.stderr)
        return 2
    source = Source()
    source.feed(page.read_text())
    seen = measure(binary, page)
    problems = check(folder, seen, source)
    shot = args.screenshot or folder / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    height = min(MAX_HEIGHT, int(seen["height"]))
    tmp = shot.with_name(f".{shot.name}.tmp.png")
    run_chromium(binary, [f"--window-size={WIDTH},{height}", "--virtual-time-budget=15000",
                          f"--screenshot={tmp.resolve()}", page.resolve().as_uri()])
    tmp.replace(shot)
    print(f"{page}: {len(seen['images'])} images, {len(seen['tables'])} results tables, "
          f"{len(source.links)} linked files; screenshot {shot} ({WIDTH} x {height} px)")
    for p in problems:
        print(f"FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
