"""A small synchronous driver for headless Chromium over its DevTools protocol.

Debian's ``chromium`` speaks the protocol on a websocket; the ``websockets``
package is the whole driver, so nothing downloads a browser or a driver binary.
One :class:`Chromium` process per test module; each :class:`Page` is a tab in its
own browser context (its own cookies and sessionStorage), attached in
flattened mode so every tab's commands and events share the one socket.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM = "/usr/bin/chromium"
LAUNCH_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

# Set on every new document before the page's own scripts run, so that a
# Content-Security-Policy violation anywhere in the page is recorded.
_WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || "inline"} (${e.sourceFile}:${e.lineNumber})`);
});
"""


class CdpError(RuntimeError):
    pass


class Chromium:
    def __init__(self, executable: str = CHROMIUM, start_timeout_s: float = 30.0):
        self.profile = Path(tempfile.mkdtemp(prefix="playground-chromium-"))
        self.process = subprocess.Popen(
            [executable, *LAUNCH_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Chromium writes the port it chose, and the browser's websocket path, here.
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout_s
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{executable} did not start its DevTools endpoint")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        self._socket = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=start_timeout_s)
        self._next_id = 0
        self.events: dict[str | None, list[dict[str, Any]]] = defaultdict(list)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError(f"{method}: no answer within {timeout} s")
            reply = json.loads(self._socket.recv(timeout=left))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events[reply.get("sessionId")].append(reply)

    def new_page(self) -> "Page":
        context = self.call("Target.createBrowserContext")["browserContextId"]
        target = self.call("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session, context)

    def close(self) -> None:
        try:
            if getattr(self, "_socket", None) is not None:
                self._socket.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab. Everything it logs (console, exceptions, network) is kept in
    :attr:`events` for the test to look at."""

    def __init__(self, browser: Chromium, session: str, context: str):
        self.browser = browser
        self.session = session
        self.context = context
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": _WATCH_CSP})

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.browser.events[self.session]

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict:
        return self.browser.call(method, params, self.session, timeout)

    def close(self) -> None:
        self.browser.call("Target.disposeBrowserContext", {"browserContextId": self.context})

    # -- navigation and script --

    def goto(self, url: str, timeout: float = 30.0) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout,
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(interval)

    # -- input, as a user gives it (real mouse and key events) --

    def center_of(self, selector: str) -> tuple[float, float]:
        rect = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        return rect[0], rect[1]

    def click(self, selector: str) -> None:
        x, y = self.center_of(selector)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def mouse(self, kind: str, x: float, y: float, buttons: int | None = None) -> None:
        pressed = kind == "mousePressed" or (kind == "mouseMoved" and buttons)
        self.call(
            "Input.dispatchMouseEvent",
            {"type": kind, "x": x, "y": y, "button": "left" if kind != "mouseMoved" or pressed else "none",
             "buttons": 1 if pressed else 0, "clickCount": 1},
        )

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text})

    def press_enter(self, ctrl: bool = False) -> None:
        common = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "modifiers": 2 if ctrl else 0}
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **common})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **common})

    def choose(self, selector: str, value: str) -> None:
        """Pick a <select> option the way its change reaches the page's script."""
        self.evaluate(
            f"(() => {{ const s = document.querySelector({json.dumps(selector)});"
            f" if (![...s.options].some((o) => o.value === {json.dumps(value)})) throw new Error('no option ' + {json.dumps(value)});"
            f" s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()"
        )

    # -- what happened --

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def problems(self) -> list[str]:
        """CSP violations, uncaught exceptions, console errors and browser log
        errors other than failed HTTP statuses (those the tests check themselves)."""
        found = [f"CSP: {v}" for v in self.evaluate("window.__cspViolations || []")]
        for event in self.events:
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('exception', {}).get('description') or params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.{params['type']}: {[a.get('value', a.get('description')) for a in params['args']]}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error" and params["entry"]["source"] != "network":
                found.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
        return found

    def network_errors(self) -> list[str]:
        return [
            e["params"]["entry"]["text"]
            for e in self.events
            if e["method"] == "Log.entryAdded" and e["params"]["entry"]["source"] == "network"
        ]

    def requests(self) -> list[dict[str, Any]]:
        """Every request the page sent, as Chromium saw it (URL, method, headers, body)."""
        return [e["params"]["request"] for e in self.events if e["method"] == "Network.requestWillBeSent"]
