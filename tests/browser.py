"""Headless Chromium for the report tests: dump a page's DOM after its scripts ran, screenshot it,
and list the network requests the page itself made (from Chromium's net log)."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--proxy-server=http://127.0.0.1:9",  # a dead port: nothing could be fetched even if asked
]


def chromium() -> str:
    """The system Chromium; the test fails (is not skipped) without one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"Chromium is missing: the browser tests need it. Install it with `{INSTALL}`")


def render(url: str, workdir: Path, *, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """``(DOM after load, URLs the page requested)``; with ``screenshot``, also a PNG of the page."""
    log = workdir / f"netlog-{len(list(workdir.glob('netlog-*')))}.json"
    command = [chromium(), *FLAGS, f"--log-net-log={log}", "--window-size=1280,1600"]
    command += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=120, cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, page_requests(log)


def page_requests(log: Path) -> list[str]:
    """URLs whose request a page started. Chromium's own background requests (updates, time, accounts)
    carry the initiator 'not an origin'; a page's carry the page's origin ('null' for file://)."""
    data = json.loads(log.read_text())
    start = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in data["events"]
        if e["type"] == start and "url" in e.get("params", {}) and e["params"].get("initiator") != "not an origin"
    ]


class Elements(HTMLParser):
    """Every start tag as ``(tag, attrs, path of enclosing (tag, attrs))``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[tuple[str, dict[str, str]]]]] = []
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.found.append((tag, attrs, list(self.stack)))
        if tag not in {"br", "img", "input", "meta", "link", "line", "circle", "rect"}:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def having(self, tag: str, cls: str | None = None):
        return [(a, path) for t, a, path in self.found if t == tag and (cls is None or cls in a.get("class", "").split())]
