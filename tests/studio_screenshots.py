"""The README's pictures of the studio, on the smol fixtures: a steering server is started, the page is driven with
the test suite's browser helpers (tests/browser.py), and PNGs are written to --out (docs/img).

    python tests/studio_screenshots.py --fixtures artifacts/fixtures/smol --vectors artifacts/vectors/smol \\
        --out docs/img [--config artifacts/tunevec.yaml]

Not a test: the pictures show what the page looks like with a model whose answers make sense. The tests save their
own screenshots of the tiny fixtures (docs/studio.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import chromium, console_errors, screenshot, wait_for  # noqa: E402
from servers import running_server  # noqa: E402

PROMPT = "How much is 7 times 8? Answer with the number only."


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fixtures", type=Path, required=True, help="a smol fixture folder")
    parser.add_argument("--vectors", type=Path, required=True, help="its vectors folder (medical, math)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument(
        "--config", help="a tunevec.yaml whose named variants the page offers (tunevec tune's)"
    )
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--url", help="use this running server (started with the same settings) instead")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = ["--adapter-rank", "128", "--max-lora-rank", "256", "--dtype", "auto", "--max-model-len", "1024"]
    if args.config:
        extra += ["--config", args.config]
    log = Path("artifacts/logs/studio-screenshots.log")
    server = (
        contextlib.nullcontext(args.url)
        if args.url
        else running_server(args.fixtures / "base", args.vectors, *extra, log=log)
    )
    with server as url, chromium() as d:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        def css(sel: str):  # noqa: ANN202
            return d.find_element(By.CSS_SELECTOR, sel)

        def all_(sel: str) -> list:
            return d.find_elements(By.CSS_SELECTOR, sel)

        def alpha(label: str, index: int, value: str) -> None:
            box = all_(f"article[data-mixture='{label}'] input.alpha-number")[index]
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(value)

        d.get(url + "/tunevec/")
        wait_for("the studio", lambda: css("#studio").is_displayed())
        css("#prompt").clear()
        css("#prompt").send_keys(args.prompt)
        # A: medical; B: math; C: the named variant tunevec tune wrote, else medical+math at 1+1
        vectors = all_("article[data-mixture='A'] select.vector")[0]
        vectors.send_keys("medical")
        css("#add-mixture").click()
        css("#add-mixture").click()
        all_("article[data-mixture='B'] select.vector")[0].send_keys("math")
        picker = all_("article[data-mixture='C'] .variant-pick select")
        if picker:
            options = [o.get_attribute("value") for o in picker[0].find_elements(By.TAG_NAME, "option")]
            picker[0].send_keys(options[-1])
        else:
            all_("article[data-mixture='C'] select.vector")[0].send_keys("math")
            css("article[data-mixture='C'] button.add-component").click()
        wait_for("describe lines", lambda: len(all_(".describe p")) >= 3)
        css("#generate").click()
        for col in all_("article.column"):
            out = col.find_element(By.CSS_SELECTOR, ".output")
            wait_for(
                "an answer", lambda o=out: o.get_attribute("data-state") in ("done", "scored", "error"), 300
            )
        args.out.mkdir(parents=True, exist_ok=True)
        # the tooltip first (a full-page capture re-lays the page out), on mixture A's most moved token
        tokens = all_("article[data-mixture='A'] .tok")
        moved = max(tokens, key=lambda t: abs(float(t.get_attribute("data-delta"))))
        ActionChains(d).move_to_element(moved).perform()
        wait_for("the tooltip", lambda: css("#tip").is_displayed())
        screenshot(d, args.out / "studio-token-view.png", full_page=False)
        ActionChains(d).move_to_element(css("h1")).perform()
        screenshot(d, args.out / "studio-compare.png")
        errors = console_errors(d)
        if errors:
            print("console errors:", errors, file=sys.stderr)
            return 1
    print(f"wrote {args.out / 'studio-compare.png'} and {args.out / 'studio-token-view.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
