"""Render a local HTML file with headless Chromium: screenshot and DOM text.

Used by tests (a person-like check that a generated page really shows its
content) and from the command line:

  python tests/render_html.py page.html --png shot.png
"""

from __future__ import annotations

import argparse
import html.parser
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_FLAGS = (
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
  "--hide-scrollbars",
)


def chromium_path() -> str | None:
  """Path of a Chromium/Chrome binary, or None."""
  for name in CHROMIUM_NAMES:
    found = shutil.which(name)
    if found:
      return found
  return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  binary = chromium_path()
  if binary is None:
    raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)})")
  with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
    cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"chromium failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
  return proc


def screenshot(html_path: str | Path, png_path: str | Path, size: tuple[int, int] = (1200, 1600), timeout: float = 120) -> Path:
  """Screenshots ``html_path`` into ``png_path`` (viewport ``size`` = width, height)."""
  url = Path(html_path).resolve().as_uri()
  png_path = Path(png_path).resolve()
  _run([f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}", url], timeout)
  if not png_path.exists() or png_path.stat().st_size == 0:
    raise RuntimeError(f"chromium wrote no screenshot at {png_path}")
  return png_path


def dump_dom(html_path: str | Path, timeout: float = 120) -> str:
  """The page's DOM after scripts ran, serialized as HTML."""
  url = Path(html_path).resolve().as_uri()
  return _run(["--dump-dom", url], timeout).stdout


class _DomSummary(html.parser.HTMLParser):
  """Collects visible text, element counts and attributes of a serialized DOM."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.text: list[str] = []
    self.tags: dict[str, int] = {}
    self.attrs: list[tuple[str, dict[str, str | None]]] = []
    self._skip = 0

  def handle_starttag(self, tag, attrs):
    self.tags[tag] = self.tags.get(tag, 0) + 1
    self.attrs.append((tag, dict(attrs)))
    if tag in ("script", "style", "title"):
      self._skip += 1

  def handle_endtag(self, tag):
    if tag in ("script", "style", "title") and self._skip:
      self._skip -= 1

  def handle_data(self, data):
    if not self._skip:
      self.text.append(data)


def parse_dom(dom: str) -> _DomSummary:
  """Parses a DOM dump: ``.text`` (visible text pieces), ``.tags`` (counts), ``.attrs``."""
  summary = _DomSummary()
  summary.feed(dom)
  summary.close()
  return summary


def dom_text(html_path: str | Path, timeout: float = 120) -> str:
  """The visible text of the rendered page (script/style contents excluded)."""
  return "".join(parse_dom(dump_dom(html_path, timeout)).text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("html")
  parser.add_argument("--png", help="write a screenshot here")
  parser.add_argument("--width", type=int, default=1200)
  parser.add_argument("--height", type=int, default=1600)
  args = parser.parse_args()
  if args.png:
    print(screenshot(args.html, args.png, (args.width, args.height)))
  else:
    print(dom_text(args.html))


if __name__ == "__main__":
  main()
