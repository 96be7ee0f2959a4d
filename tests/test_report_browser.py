"""The report as a reader sees it: the demo's report.html opened in headless Chromium (Debian's package;
CI installs it), screenshotted, and checked for console errors, network requests, broken images, the
metrics table and the galleries. Skipped only where no Chromium is installed."""
import csv

import numpy as np
import pytest

from openood_diffguard.report.browser import check_page, find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium executable (apt-get install chromium)")


def test_demo_report_in_headless_chromium(quick_demo, tmp_path):
    from PIL import Image

    out, _ = quick_demo
    page = out / "report.html"
    assert page.is_file() and (out / "metrics.csv").is_file()  # the demo writes it next to its csv
    shot = tmp_path / "report.png"
    seen = check_page(page, shot, width=1200)
    assert seen.problems() == [], seen.problems()
    assert not seen.console_errors and not seen.requests and not seen.broken_images
    methods = [r["method"] for r in csv.DictReader(open(out / "metrics.csv"))]
    assert seen.metrics_rows == len(methods) == 9
    assert seen.sections == ["metrics", "curves", "histograms", "galleries", "config"]
    # every diffusion detector: two rows of most confident mistakes (6 each) + typical cases
    assert seen.cards >= 3 * 12
    assert seen.images >= 2 + seen.cards  # figures + at least the input picture of every card
    assert "demo" in seen.title
    from openood_diffguard.report.gallery import load_galleries

    kinds = {m: {frozenset(g.images) for g in gs.values()} for m, gs in load_galleries(out / "gallery").items()}
    assert kinds == {"DiffGuard": {frozenset({"input", "inversion", "synthesis"})},
                     "DiffNB": {frozenset({"input", "noised", "neighbour"})}, "LFDN": {frozenset({"input"})}}
    img = Image.open(shot)
    assert img.size == (1200, seen.height) and seen.height > 3000
    pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page


def test_browser_check_catches_a_broken_page(tmp_path):
    """The check can fail: a console error, an exception, a broken image and a network request are reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body><table><tr><td>1</td></tr></table>"
                   '<img alt="broken" src="data:image/png;base64,AAAA"><img alt="remote" src="http://127.0.0.1:9/x.png">'
                   "<script>console.error('boom'); null.f();</script></body></html>")
    seen = check_page(bad, width=400)
    text = " | ".join(seen.problems())
    assert "console error: boom" in text
    assert "TypeError" in text
    assert "image did not load: broken" in text and "image did not load: remote" in text
    assert "network request: http://127.0.0.1:9/x.png" in text
