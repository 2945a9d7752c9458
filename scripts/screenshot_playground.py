"""Re-make README's playground screenshot (docs/playground.png).

    python scripts/screenshot_playground.py

The service's ingress over the shipped registry (the embedded model; its
stages in this process, no Ray) on a free 127.0.0.1 port, and Debian's
headless Chromium (the test suite's CDP driver, tests/browser/cdp.py)
streaming a generation of two images the embedded model can draw.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a small yellow triangle in the top left corner, purple background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    parser.add_argument("--model", default="gpt-image-2.5-sunburst")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--quality", default="medium", help="medium: the pipeline's default steps, what the model was evaluated at")
    parser.add_argument("--seed", default="1234")
    args = parser.parse_args()

    from tests.browser.cdp import Chromium
    from tests.browser.conftest import PlaygroundServer, serving
    from tests.browser.test_playground import open_playground
    from tests.conftest import in_process_app
    from tests.integration.conftest import free_port

    app = in_process_app(ROOT / "configs" / "models.yaml", tempfile.mkdtemp(prefix="screenshot-"))
    port = free_port()
    browser = Chromium()
    try:
        with serving(app, port):
            page = browser.new_page()
            page.call("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            open_playground(page, PlaygroundServer(f"http://127.0.0.1:{port}"))
            page.choose("#model", args.model)
            page.choose("#quality", args.quality)
            page.choose("#size", "custom")
            page.type_into("#size-custom", args.size)
            page.evaluate("document.querySelector('#n').value = '2'")
            page.type_into("#seed", args.seed)
            page.type_into("#prompt", PROMPT)
            page.press_enter(ctrl=True)
            page.wait_for("document.querySelectorAll('.result[data-state=final]').length == 2", timeout=120)
            time.sleep(0.5)  # the last image's decode and layout
            print(page.screenshot(Path(args.out)))
    finally:
        browser.close()

if __name__ == "__main__":
    main()
