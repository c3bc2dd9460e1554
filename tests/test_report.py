"""The bundle's reports: report.html with its plots, GFLOP/s against the measured peak, and the page as
Chromium renders it (skipped, with the reason, where Chromium is not installed)."""
import copy
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from compressor import report


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_bundle_has_html_report_listed_and_self_contained(tiny_bundle):
    m = _manifest(tiny_bundle)
    assert "report.html" in m["files"]
    page = (tiny_bundle / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count("data:image/png;base64,") == 2  # quality-vs-latency and the stage timeline
    assert "<h2>local-cpu</h2>" in page and "GFLOP/s" in page and "of peak" in page
    for stage in m["stages"]:  # stages with no recipe section (search, prune here) are left out
        assert (f"<td>{stage['name']}</td>" in page) != bool(stage.get("skipped"))
    assert "src='http" not in page and 'src="http' not in page  # nothing fetched from the network


def test_measurements_state_gflops_against_measured_peak(tiny_bundle):
    m = _manifest(tiny_bundle)
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]
    peak = prof["peak_gflops"]["local-cpu"]
    assert peak["gflops"] > 0.5 and "measured" in peak["source"]
    for meas in m["measurements"]:
        assert meas["flops"] > 0 and meas["gflops"] > 0
        assert meas["peak_gflops"] == peak["gflops"]
        assert meas["roofline"] == pytest.approx(meas["gflops"] / peak["gflops"])
        role = "teacher" if "teacher" in meas["artifact"] else "student"
        assert meas["gflops"] == pytest.approx(prof["flops"][role] * meas["batch"] / meas["p50_ms"] / 1e6)
    md = (tiny_bundle / "report.md").read_text()
    assert "| GFLOP/s | of peak |" in md and "Peak: local-cpu" in md


def test_html_tolerates_old_and_searched_manifests(tiny_bundle, tmp_path):
    m = _manifest(tiny_bundle)
    old = copy.deepcopy(m)  # a bundle from before GFLOP/s and search: no peaks, no search stage
    for s in old["stages"]:
        if s["name"] == "profile":
            s["metrics"].pop("peak_gflops", None)
            s["metrics"].pop("flops", None)
    for meas in old["measurements"]:
        meas.update(gflops=None, roofline=None, peak_gflops=None)
    page = report.html(old, None)
    assert "<h2>local-cpu</h2>" in page and "n/a" in page
    assert not (tmp_path / "report.html").exists()

    searched = copy.deepcopy(m)
    cand = lambda score, ms, ok=True: {"family": "cnn", "genome": {}, "key": f"k{score}", "feasible": ok,  # noqa: E731
                                       "metrics": {"score": score, "latency_ms": {"local-cpu": ms},
                                                   "latency_label": "predicted", "params": 1, "flops": 1}}
    front = [cand(-1.0, 0.1), cand(-0.5, 0.3)]
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "candidates.json").write_text(json.dumps(
        {"candidates": [*front, cand(-2.0, 0.2), cand(-0.1, 5.0, ok=False)]}))
    searched["stages"].insert(1, {"name": "search", "config": {}, "seconds": 1.0, "parent": "analyze", "started": "",
                                  "metrics": {"front": front, "best": front[1]},
                                  "outputs": {"candidates": "search/candidates.json"}})
    page = report.html(searched, tmp_path)
    assert (tmp_path / "report.html").read_text() == page
    assert page.count("data:image/png;base64,") == 2 and "<td>search</td>" in page

    bare = {"name": "bare", "created": "", "seed": 0, "toolchain": {}, "stages": [], "measurements": []}
    assert "<h1>bare: compression report</h1>" in report.html(bare)  # no measurements, no stages: no plots


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(tiny_bundle, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    profile_dir = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile_dir}", f"--screenshot={shot}",
                        "--window-size=1200,1600", (tiny_bundle / "report.html").resolve().as_uri()],
                       check=True, capture_output=True, timeout=60, env={**os.environ, "HOME": profile_dir})
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    # The page drew something: many distinct grey levels (text, tables, plots), not a blank or error page.
    assert len(img.getcolors(256) or []) > 50
    keep = os.environ.get("REPORT_SCREENSHOT")  # set to a path to keep the screenshot and look at it
    if keep:
        shutil.copy(shot, keep)
