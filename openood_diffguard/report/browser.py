"""Headless Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so no websocket client or browser driver package is
needed. Used to screenshot a report and, in the tests, to check it the way a reader sees it: it loads,
logs no console error, requests nothing from the network, and its images and tables are there.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: executables tried in order (``OPENOOD_DIFFGUARD_CHROMIUM`` first)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
#: flags for a quiet, offline, throw-away browser
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars")


class BrowserMissing(RuntimeError):
    """No Chromium / Chrome executable found."""


def find_chromium() -> str | None:
    env = os.environ.get("OPENOOD_DIFFGUARD_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    """What a browser saw when it opened a page."""

    url: str
    title: str = ""
    images: int = 0
    broken_images: list[str] = field(default_factory=list)  # alt texts of images that did not decode
    tables: int = 0
    metrics_rows: int = 0
    cards: int = 0  # gallery cards
    sections: list[str] = field(default_factory=list)
    height: int = 0
    console_errors: list[str] = field(default_factory=list)  # console.error, uncaught exceptions, error log entries
    requests: list[str] = field(default_factory=list)  # anything fetched besides the page and data: URIs
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        out = [f"console error: {e}" for e in self.console_errors]
        out += [f"network request: {u}" for u in self.requests]
        out += [f"image did not load: {a}" for a in self.broken_images]
        if self.images == 0:
            out.append("no images")
        if self.tables == 0:
            out.append("no table")
        return out

    def summary(self) -> str:
        return (f"{self.images} images ({len(self.broken_images)} broken), {self.tables} tables, "
                f"{len(self.console_errors)} console errors, {len(self.requests)} network requests, "
                f"page height {self.height}px")


class Chromium:
    """A headless browser process and its DevTools pipe (``with Chromium() as b: b.send(...)``)."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserMissing("no Chromium found (tried $OPENOOD_DIFFGUARD_CHROMIUM, " + ", ".join(CANDIDATES)
                                 + "); install it, e.g. `apt-get install chromium`")
        self.timeout = timeout
        self.events: list[dict] = []
        self._id = 0
        self._buf = b""

    def __enter__(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="odg-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self._log = open(Path(self._profile) / "stderr.log", "wb")

        def pipes_on_3_and_4() -> None:  # runs in the child before exec: the browser's command / reply fds
            hi_r, hi_w = os.dup(to_browser_r), os.dup(from_browser_w)  # never clobber one with the other
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)
            os.set_inheritable(3, True)  # dup2 onto itself (hi_r == 3) would keep close-on-exec
            os.set_inheritable(4, True)

        # close_fds=False: the fds made in pipes_on_3_and_4 must survive; Python's own fds are close-on-exec
        self.proc = subprocess.Popen([self.executable, *FLAGS, f"--user-data-dir={self._profile}",
                                      "--remote-debugging-pipe", "about:blank"], preexec_fn=pipes_on_3_and_4,
                                     close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", timeout=10)
                except (RuntimeError, OSError, TimeoutError):
                    pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------ protocol
    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (code {self.proc.poll()}); its log: "
                                       f"{(Path(self._profile) / 'stderr.log').read_text(errors='replace')[-2000:]}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for ev in self.events:
                if ev.get("method") == method:
                    return ev
            self.events.append(self._read(deadline))


_INSPECT = """(() => {
  const imgs = Array.from(document.images);
  return {title: document.title, images: imgs.length,
          broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
          tables: document.querySelectorAll('table').length,
          metricsRows: document.querySelectorAll('#metrics tbody tr').length,
          cards: document.querySelectorAll('.card').length,
          sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
          height: Math.ceil(document.documentElement.scrollHeight)};
})()"""


def check_page(html: str | Path, screenshot: str | Path | None = None, width: int = 1280,
               height: int | None = None, executable: str | None = None, timeout: float = 60.0) -> PageCheck:
    """Open a local HTML file in headless Chromium, inspect it and optionally save a PNG screenshot (the
    whole page, or its top ``height`` pixels)."""
    url = Path(html).resolve().as_uri()
    with Chromium(executable, timeout) as b:
        target = next(t for t in b.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        s = b.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=s)
        b.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                      "mobile": False}, session=s)
        b.send("Page.navigate", {"url": url}, session=s)
        b.wait_event("Page.loadEventFired")
        seen = b.send("Runtime.evaluate", {"expression": _INSPECT, "returnByValue": True}, session=s)["result"]["value"]
        check = PageCheck(url, seen["title"], seen["images"], seen["broken"], seen["tables"], seen["metricsRows"],
                          seen["cards"], seen["sections"], seen["height"])
        if screenshot is not None:
            h = seen["height"] if height is None else min(height, seen["height"])
            b.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": h, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=s)
            shot = b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                     "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1}},
                          session=s)
            path = Path(screenshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(shot["data"]))
            check.screenshot = path
        for ev in b.events:
            method, p = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                check.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                check.console_errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                check.console_errors.append(p["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                req = p.get("request", {}).get("url", "")
                if not req.startswith("data:") and req != url:
                    check.requests.append(req)
    return check
