"""report.html: built for a real tiny comparison, collect and search, and rendered in a real
browser (headless Chromium, driven over the DevTools protocol with ``websocket-client``).

The browser tests need ``chromium`` (Debian's package; ``.ci/run`` installs it) and the
``websocket-client`` package (the ``test`` extra). Without them they are skipped with a message,
except where ``CREDITLAB_REQUIRE_DATA=1`` (CI), where they fail.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from creditlab import report
from creditlab.compare import collect, compare, plan
from creditlab.search import run_search
from creditlab.train import train

DATASET = "fake:n=60,classes=3,shape=1x4x4,test=20"
BASE = {"name": "report-test", "dataset": DATASET, "model": {"arch": "16-8-3", "act": "tanh"}, "loss": "mse",
        "optimizer": {"name": "sgd", "lr": 0.05}, "epochs": 2, "batch_size": 16, "log_every": 1, "threads": 1}
from tests.threads import one_thread


# ---- the runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    with one_thread():
        out = tmp_path_factory.mktemp("report") / "cmp"
        compare(dict(BASE, algos=["bp", "fa"], seeds=[0, 1]), out, progress=False)
    return out


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory) -> Path:
    with one_thread():
        out = tmp_path_factory.mktemp("report") / "search"
        cfg = dict(BASE, name="report-search", algo="fa", log_every=0,
                   search={"space": {"lr": ["loguniform", 1e-3, 1e-1], "momentum": ["choice", [0.0, 0.9]]}})
        run_search(cfg, 3, out, seed=0)
    return out


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _visible_text(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    page = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def _self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.I)
    srcs = re.findall(r"""<img[^>]*\ssrc="([^"]*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_writes_a_self_contained_report(compare_dir):
    page = _text(compare_dir / "report.html")
    _self_contained(page)
    text = _visible_text(page)
    for want in ("Summary", "Paired statistics against the first algorithm", "Curves", "Angle to backprop, per layer",
                 "Feedback alignment", "Provenance", "name: report-test", "test accuracy at the validation-selected"):
        assert want in text, want
    assert 'id="fig-curves"' in page and 'id="fig-angles"' in page and 'id="fig-feedback-fa"' in page
    assert (compare_dir / "summary.md").is_file() and (compare_dir / "summary.json").is_file()  # kept
    # paired against bp, 2 seeds: per-seed differences and an interval
    assert re.search(r"0: [+-]\d+\.\d\d, 1: [+-]\d+\.\d\d", text)
    assert re.search(r"\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", text)


def test_report_numbers_match_the_runs(compare_dir):
    text = _visible_text(_text(compare_dir / "report.html"))
    for algo in ("bp", "fa"):
        vals = [json.loads((compare_dir / algo / f"seed{s}" / "summary.json").read_text())["test_accuracy_at_best_val"]
                for s in (0, 1)]
        assert report.mean_pm_std(vals, 100.0) in text
    bp = [json.loads((compare_dir / "bp" / f"seed{s}" / "summary.json").read_text())["test_accuracy_at_best_val"]
          for s in (0, 1)]
    fa = [json.loads((compare_dir / "fa" / f"seed{s}" / "summary.json").read_text())["test_accuracy_at_best_val"]
          for s in (0, 1)]
    assert f"{100 * (sum(fa) - sum(bp)) / 2:+.2f}" in text


def test_old_run_directories_show_a_dash(compare_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(compare_dir, old)
    (old / "report.html").unlink()
    for run in (old / "fa").glob("seed*"):
        s = json.loads((run / "summary.json").read_text())
        for key in ("test_accuracy_at_best_val", "best_val_epoch", "environment"):
            s.pop(key, None)
        (run / "summary.json").write_text(json.dumps(s))
    (old / "bp" / "seed1" / "metrics.jsonl").unlink()  # the epoch curves come from metrics.csv then
    report.write_report(old)
    page = _text(old / "report.html")
    _self_contained(page)
    rows = re.findall(r"<tr>\s*<td class=\"l\"><code>fa</code></td>(.*?)</tr>", page, re.S)  # summary first
    assert rows and "<td class=\"\">-</td>" in rows[0]
    assert "no seed finished by both" in page  # fa has no selected-epoch figure any more


def test_provenance_comes_from_the_runs_environment_block(compare_dir, tmp_path):
    runs = tmp_path / "env"
    shutil.copytree(compare_dir, runs)
    for i, path in enumerate(sorted(runs.glob("*/seed*/summary.json"))):
        s = json.loads(path.read_text())
        s["environment"] = {"creditlab_version": "9.9.9", "git_commit": "abc123", "hostname": f"node{i % 2}",
                            "data_files": {"generated": DATASET}}
        path.write_text(json.dumps(s))
    report.write_report(runs)
    text = _visible_text(_text(runs / "report.html"))
    assert "from the runs' summary.json environment block" in text.replace("&#x27;", "'")
    assert "9.9.9" in text and "abc123" in text and "differs between runs: node0; node1" in text
    assert "data_files.generated" in text


def test_one_seed_prints_the_value_alone_and_no_interval(tmp_path):
    out = tmp_path / "one"
    compare(dict(BASE, algos=["bp", "fa"], seeds=[3], epochs=1), out, progress=False)
    text = _visible_text(_text(out / "report.html"))
    assert "±" not in text.split("Paired statistics")[0].split("Summary", 1)[1].split("mean angle")[1]
    assert "n=1: no interval" in text
    assert report.mean_pm_std([0.5]) == "0.50" and report.mean_pm_std([]) == "-"


def test_collect_writes_a_report_naming_the_missing_runs(tmp_path):
    out = tmp_path / "plan"
    runs = plan(dict(BASE, algos=["bp", "fa"], seeds=[0], epochs=1), out)
    from creditlab import config as config_mod

    bp = runs[0]
    train(config_mod.load(bp.dir / "config.yaml"), bp.dir, progress=False, overwrite=True)
    collect(out)
    page = _text(out / "report.html")
    _self_contained(page)
    assert "collect directory" in page and "missing" in page


def test_a_failing_report_never_loses_the_summary(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "write_report", boom)
    out = tmp_path / "c"
    compare(dict(BASE, algos=["bp"], seeds=[0], epochs=1), out, progress=False)
    assert (out / "summary.json").is_file() and (out / "summary.md").is_file()
    assert not (out / "report.html").exists()
    assert "creditlab: report.html not written: RuntimeError: boom" in capsys.readouterr().out


def test_published_values_are_matched_to_algorithms():
    block = {"kind": "paper", "source": "T1", "values": {"bp": 1.5, "fa": {"value": 2.0, "kind": "authors-code",
                                                                           "source": "nb"}, "np_x": 3}}
    leaves = report._published_leaves(block)
    assert {p["path"]: p["kind"] for p in leaves} == {"bp": "paper", "fa": "authors-code", "np_x": "paper"}
    assert [p["value"] for p in report._published_for("fa", ["bp", "fa"], leaves)] == [2.0]
    assert report._published_for("np:sigma=1", ["np:sigma=1", "np:sigma=2"], leaves) == []
    legacy = report._published_leaves({"source": "Table 1", "test_error_pct": {"bp": 2.65}})
    assert legacy == [{"path": "test_error_pct.bp", "value": 2.65, "kind": None, "source": "Table 1", "note": ""}]


def test_search_writes_a_self_contained_report(search_dir):
    page = _text(search_dir / "report.html")
    _self_contained(page)
    text = _visible_text(page)
    assert "Trials" in text and "Hyper-parameters" in text and "Provenance" in text
    assert 'id="fig-scores"' in page and 'id="fig-effects"' in page and 'id="fig-trial-curves"' in page
    res = json.loads((search_dir / "search.json").read_text())
    assert f"{res['best']['score']:.4f}" in text
    assert "name: report-search" in text  # the search's resolved config


# ---- the browser ---------------------------------------------------------------------------
def _need(what: str) -> None:
    if os.environ.get("CREDITLAB_REQUIRE_DATA"):
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(f"{what}; install it to render report.html in a browser")


def _chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    _need("no chromium on PATH (Debian: apt-get install chromium)")
    raise AssertionError  # unreachable


class Browser:
    """Headless Chromium and one page, over the DevTools protocol."""

    def __init__(self):
        try:
            import websocket  # websocket-client
        except ImportError:
            _need("the websocket-client package is not installed (pip install -e '.[test]')")
        binary = _chromium_binary()
        self.profile = Path(tempfile.mkdtemp(prefix="creditlab-chromium-"))
        self.log = open(self.profile / "stderr.log", "w")  # noqa: SIM115  (closed in close())
        args = [binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--remote-allow-origins=*", "--window-size=1400,1000", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # root (CI): Chromium's sandbox refuses to start otherwise
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"chromium did not start: {self.stderr()}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            if not targets:
                if time.monotonic() > deadline:
                    raise AssertionError(f"chromium has no page target: {self.stderr()}")
                time.sleep(0.1)
        self.ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def stderr(self) -> str:
        self.log.flush()
        return (self.profile / "stderr.log").read_text()[-2000:]

    def call(self, method: str, **params):
        self.next_id += 1
        me = self.next_id
        self.ws.send(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == me:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e["method"] == method:
                return e
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg
        raise AssertionError(f"no {method} within {timeout} s")

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.evaluate("1")  # drain: events sent before this reply are collected

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def problems(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log error: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"failed load: {p.get('errorText')} ({p.get('type')})")
            elif m == "Network.responseReceived" and p.get("response", {}).get("status", 200) >= 400:
                out.append(f"HTTP {p['response']['status']}: {p['response'].get('url')}")
        return out

    def screenshot(self) -> bytes:
        res = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(res["data"])

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


BOXES = """JSON.stringify({
  tables: Array.from(document.querySelectorAll('table')).map(t => {
    const r = t.getBoundingClientRect(); return {cls: t.className, w: r.width, h: r.height}; }),
  images: Array.from(document.querySelectorAll('img')).map(i => {
    const r = i.getBoundingClientRect();
    return {id: i.parentElement.id, w: r.width, h: r.height, complete: i.complete, natural: i.naturalWidth}; }),
  resources: performance.getEntriesByType('resource').map(e => e.name),
  title: document.title})"""


def _render(browser: Browser, page: Path, out_png: Path) -> dict:
    t0 = time.perf_counter()
    browser.open(page)
    info = json.loads(browser.evaluate(BOXES))
    shot = browser.screenshot()
    out_png.write_bytes(shot)
    info["seconds"] = time.perf_counter() - t0
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000, "empty screenshot"
    assert browser.problems() == [], browser.problems()
    assert info["resources"] == [], f"report.html loaded resources: {info['resources']}"
    n_img = _text(page).count("<img ")
    assert len(info["images"]) == n_img and n_img > 0
    for img in info["images"]:
        assert img["complete"] and img["natural"] > 0, f"figure {img['id']} did not decode"
        assert img["w"] > 50 and img["h"] > 50, f"figure {img['id']} is not visible: {img}"
    for table in info["tables"]:
        assert table["w"] > 0 and table["h"] > 0, f"table {table['cls']} is not visible"
    return info


def test_compare_report_renders_in_chromium(browser, compare_dir, tmp_path):
    info = _render(browser, compare_dir / "report.html", tmp_path / "compare.png")
    assert {"summary", "paired", "angles"} <= {t["cls"] for t in info["tables"]}
    assert {"fig-curves", "fig-angles", "fig-feedback-fa"} <= {i["id"] for i in info["images"]}
    assert info["title"].startswith("report-test")


def test_search_report_renders_in_chromium(browser, search_dir, tmp_path):
    info = _render(browser, search_dir / "report.html", tmp_path / "search.png")
    assert {"summary", "trials"} <= {t["cls"] for t in info["tables"]}
    assert {"fig-scores", "fig-effects", "fig-trial-curves"} <= {i["id"] for i in info["images"]}
