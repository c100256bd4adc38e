"""Offline `dvc plots` pages (tools/offline_plots.py).

Without a browser or a registry: the page is built from pinned, checked scripts (a stand-in `npm`
packs local tarballs), a rerun is a no-op, and every failure is one line that leaves DVC on its
default page. With headless Chromium and the network blocked: every chart of a classification and
of a regression run draws (marks counted in the SVG), with the axis titles of dvc.yaml, and the
plots that do not apply to the task are left out; DVC's default (CDN) page draws nothing under the
same flags, and the flags block even a loopback server that would serve the scripts.
"""

from __future__ import annotations

import csv
import hashlib
import html.parser
import http.server
import io
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_PARAMS, copy_project, run
from tools import offline_plots

REQUIRE_BROWSER = "TAPEWORK_REQUIRE_BROWSER"
# Everything but file:// goes to a proxy on the discard port, loopback included, and no host name resolves.
NETWORK_OFF = ("--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND")
# Plots that have no data for a task: the page leaves them out and names them in one line.
NOT_DRAWN = {"classification": {"predicted_vs_actual"}, "regression": {"accuracy", "accuracy_spread", "confusion"}}
TASK_PARAMS = {
    "classification": {**TINY_PARAMS, "repeats.extra_seeds": [7]},  # two seeds: the spread charts draw a band of some width
    "regression": {**TINY_PARAMS, "download.dataset": "diabetes", "train.epochs": 5, "train.learning_rate": 0.01},
}


# ---- building the page, with a stand-in npm (no network) ----------------------------------------

FAKE_NPM = """#!/usr/bin/env python3
# Stand-in for `npm pack <specs> --pack-destination DIR ...`: copies <name>-<version>.tgz from
# $FAKE_NPM_STORE, logs each call to $FAKE_NPM_LOG, and fails like npm when $FAKE_NPM_FAIL is set.
import os, shutil, sys
with open(os.environ["FAKE_NPM_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_NPM_FAIL"):
    sys.stderr.write("npm error code ETARGET\\nnpm error notarget No matching version found for vega@5.33.1.\\nnpm error A complete log of this run can be found in: /x.log\\n")
    sys.exit(1)
args = sys.argv[1:]
destination = args[args.index("--pack-destination") + 1]
for spec in [a for a in args[1:] if not a.startswith("-") and a != destination]:
    name, version = spec.rsplit("@", 1)
    shutil.copy(os.path.join(os.environ["FAKE_NPM_STORE"], f"{name}-{version}.tgz"), destination)
"""


def tarball(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A stand-in npm on PATH, three small packages, a pins file that pins them, and a DVC repo to configure."""
    store, bin_dir, repo = tmp_path / "store", tmp_path / "bin", tmp_path / "repo"
    for folder in (store, bin_dir, repo / ".dvc"):
        folder.mkdir(parents=True)
    (repo / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    npm.chmod(0o755)
    scripts = {
        ("vega", "5.33.1", "build/vega.min.js"): b"var vega = {ok: 1}; // {not a placeholder}",
        ("vega-lite", "5.23.0", "build/vega-lite.min.js"): b"var vegaLite = {};",
        ("vega-embed", "6.29.0", "build/vega-embed.min.js"): b"function vegaEmbed() {}",
    }
    lines = []
    for (name, version, file), data in scripts.items():
        tarball(store / f"{name}-{version}.tgz", {file: data, "package.json": b"{}"})
        lines.append(f"{name} {version} {file} {hashlib.sha256(data).hexdigest()}")
    pins = tmp_path / "test.pins"
    pins.write_text("# package version file sha256\n" + "\n".join(lines) + "\n")
    log = tmp_path / "npm.log"
    monkeypatch.setenv("FAKE_NPM_STORE", str(store))
    monkeypatch.setenv("FAKE_NPM_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return repo, pins, log, scripts


def test_page_inlines_the_pinned_scripts_once_and_configures_dvc(fake_registry, capsys):
    repo, pins, log, scripts = fake_registry
    assert offline_plots.main(repo, pins) == 0
    assert "inlined into .offline-plots/page.html" in capsys.readouterr().err
    page = (repo / ".offline-plots/page.html").read_text()
    for data in scripts.values():
        assert data.decode() in page
    assert page.count("{plot_divs}") == 1 and "{refresh_tag}" in page
    assert "{scripts}" not in page  # where DVC would write its CDN <script src> tags
    assert not re.search(r"<script[^>]*\bsrc=", page)
    for (name, version, _), data in scripts.items():  # the checked files lie beside the page
        assert (repo / ".offline-plots" / f"{name}-{version}.min.js").read_bytes() == data
    assert "html_template = ../.offline-plots/page.html" in (repo / ".dvc/config.local").read_text()
    assert "html_template" not in (repo / ".dvc/config").read_text()
    assert offline_plots.is_current(repo, pins)
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0 ")

    # A rerun with the page current does nothing: no npm call, no output.
    assert offline_plots.main(repo, pins) == 0
    assert capsys.readouterr().err == "" and len(log.read_text().splitlines()) == 1

    # Without the setting (config.local deleted) a rerun only sets it again.
    (repo / ".dvc/config.local").unlink()
    assert offline_plots.main(repo, pins) == 0
    assert offline_plots.is_current(repo, pins) and len(log.read_text().splitlines()) == 1
    capsys.readouterr()

    # Editing the pins file makes the page stale: the next run rebuilds it.
    pins.write_text(pins.read_text() + "# a comment\n")
    assert not offline_plots.is_current(repo, pins)
    assert offline_plots.main(repo, pins) == 0
    assert len(log.read_text().splitlines()) == 2


def failure_line(repo: Path, pins: Path, capsys, npm: str = "npm") -> str:
    assert offline_plots.main(repo, pins, npm) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("offline plots: ") and lines[0].endswith("falls back to DVC's default page, which loads Vega from the web")
    assert not (repo / ".offline-plots").exists() and not offline_plots.configured(repo)  # DVC never names a missing page
    return lines[0]


def test_a_script_that_differs_from_its_pin_is_refused_in_one_line(fake_registry, capsys):
    repo, pins, _, _ = fake_registry
    assert offline_plots.main(repo, pins) == 0  # a working page first: a failed rebuild must remove it
    capsys.readouterr()
    good = hashlib.sha256(b"var vegaLite = {};").hexdigest()
    pins.write_text(pins.read_text().replace(good, "0" * 64))
    line = failure_line(repo, pins, capsys)
    assert f"build/vega-lite.min.js of vega-lite@5.23.0 has SHA-256 {good}, test.pins pins {'0' * 64}" in line


def test_npm_failures_are_one_line(fake_registry, capsys, monkeypatch):
    repo, pins, _, _ = fake_registry
    line = failure_line(repo, pins, capsys, npm="no-such-npm-here")
    assert "`no-such-npm-here` is not on PATH: install Node.js with npm and rerun scripts/env.sh" in line
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    line = failure_line(repo, pins, capsys)
    assert "`npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0` failed (exit 1): code ETARGET; notarget No matching version found for vega@5.33.1." in line


def test_a_script_that_would_end_the_script_element_is_refused(fake_registry, capsys):
    repo, pins, _, _ = fake_registry
    store = Path(os.environ["FAKE_NPM_STORE"])
    data = b"var s = '</script>';"
    tarball(store / "vega-embed-6.29.0.tgz", {"build/vega-embed.min.js": data})
    pins.write_text(re.sub(r"(vega-embed 6\.29\.0 build/vega-embed\.min\.js )\w+", rf"\g<1>{hashlib.sha256(data).hexdigest()}", pins.read_text()))
    line = failure_line(repo, pins, capsys)
    assert "build/vega-embed.min.js of vega-embed@6.29.0 contains '</script' and cannot be inlined" in line


def test_the_committed_pins_are_well_formed_and_dvc_config_names_no_template():
    pins = offline_plots.read_pins()
    assert [pin.package for pin in pins] == ["vega", "vega-lite", "vega-embed"]  # the order the page loads them in
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", pin.version) for pin in pins)  # exact versions, no ranges
    # The setting lives in the git-ignored .dvc/config.local: a committed one would break `dvc plots`
    # wherever the page has not been built.
    assert "html_template" not in (ROOT / ".dvc/config").read_text()
    assert f"/{offline_plots.OUT_DIR}/" in (ROOT / ".gitignore").read_text().splitlines()


# ---- rendering in headless Chromium ------------------------------------------------------------


def chromium() -> str:
    """The browser, or a skip (a failure under TAPEWORK_REQUIRE_BROWSER=1, which .ci/run sets)."""
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_BROWSER}=1 requires it")
        pytest.skip(f"{reason}; set {REQUIRE_BROWSER}=1 to make this a failure")
    return path


def built_page() -> Path:
    """The page scripts/env.sh built for this checkout, or a skip (a failure under TAPEWORK_REQUIRE_BROWSER=1)."""
    if not offline_plots.page_is_current(ROOT):
        reason = f"{ROOT / offline_plots.OUT_DIR / offline_plots.PAGE} is missing or stale: scripts/env.sh builds it (python -m tools.offline_plots)"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_BROWSER}=1 requires it")
        pytest.skip(reason)
    return ROOT / offline_plots.OUT_DIR / offline_plots.PAGE


def dump_dom(url: str, profile: Path, network: bool = False) -> str:
    """The DOM after the page's scripts ran (virtual time lets vega-embed's promises settle)."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
        "--virtual-time-budget=15000", *(() if network else NETWORK_OFF), "--dump-dom", url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


NOTE = "(the not-drawn note)"  # stands for the note's class on the reader's stack


@dataclass
class Chart:
    marks: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # "mark-line" -> its items' attributes
    axis_titles: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)  # chart title and facet headers


class PageReader(html.parser.HTMLParser):
    """Per plot div (`<div id=NAME class="vega-embed ...">`): the items of every data mark
    (SVG elements inside a `g.role-mark`), the axis titles and the titles; and the not-drawn note."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, Chart] = {}
        self.not_drawn: str | None = None
        self._stack: list[tuple[str, str, str | None]] = []  # (tag, class, chart name)

    def _chart(self) -> str | None:
        return self._stack[-1][2] if self._stack else None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        classes = values.get("class", "")
        chart = self._chart()
        if tag == "div" and "vega-embed" in classes.split():
            chart = values["id"]
            self.charts[chart] = Chart()
        parent = next((cls for t, cls, _ in reversed(self._stack) if t == "g"), "")
        if chart and tag != "g" and " role-mark" in f" {parent}":
            self.charts[chart].marks.setdefault(parent.split()[0], []).append(values)
        if tag == "p" and values.get("id") == "tapework-not-drawn":
            classes = NOTE
            self.not_drawn = None if "hidden" in values else ""
        if tag not in self.VOID:
            self._stack.append((tag, classes, chart))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self._stack or not data.strip():
            return
        if self._stack[-1][1] == NOTE and self.not_drawn is not None:
            self.not_drawn += data
        chart = self._chart()
        group = next((cls for t, cls, _ in reversed(self._stack) if t == "g"), "")
        if chart and "role-axis-title" in group:
            self.charts[chart].axis_titles.append(data.strip())
        elif chart and "role-title-text" in group:
            self.charts[chart].titles.append(data.strip())


def read_page(dom: str) -> PageReader:
    reader = PageReader()
    reader.feed(dom)
    return reader


def vertices(path: str) -> int:
    """Points of an SVG path made of one M and its L segments."""
    return path.count("L") + 1 if path.startswith("M") else 0


def vega_plots(repo: Path) -> dict[str, dict]:
    """The repo's dvc.yaml top-level plots drawn by Vega (not the images), by name."""
    plots = {}
    for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, dict):
            name, props = next(iter(entry.items()))
            plots[name] = props
    return plots


def check_drew(chart: Chart, name: str, props: dict, repo: Path, epochs: int) -> None:
    """The chart drew its data: marks in proportion to the rows behind it, and its dvc.yaml titles."""
    assert sorted(chart.axis_titles) == sorted([props["x_label"], props["y_label"]]), (name, chart.axis_titles)
    assert props["title"] in chart.titles, (name, chart.titles)
    if props["template"] == "linear":
        # Train and validation curves, each through every epoch (DVC's template draws each twice: smoothed and raw).
        lines = [item["d"] for item in chart.marks.get("mark-line", []) if item.get("d")]
        assert len(lines) >= 2 and all(vertices(line) == epochs for line in lines), (name, lines)
    elif props["template"] == "scatter":
        rows = list(csv.DictReader((repo / next(iter(props["y"]))).open()))
        assert len(chart.marks.get("mark-symbol", [])) == len(rows) > 0, name  # one point per test example
    elif props["template"] == "confusion":
        rows = list(csv.DictReader((repo / next(iter(props["y"]))).open()))
        actual, predicted = {row["actual"] for row in rows}, {row["predicted"] for row in rows}
        cells = [item for item in chart.marks.get("mark-rect", []) if item.get("d")]
        # DVC's template draws the whole actual x predicted grid (zero cells too), then a count per cell.
        assert len(cells) >= len(actual) * len(predicted) > 0 and len(chart.marks.get("mark-text", [])) == len(actual) * len(predicted), name
    elif props["template"] == "band":
        # The mean over seeds through every epoch, and a min-max band under it, for each of train and validation.
        lines = [item["d"] for item in chart.marks.get("mark-line", []) if item.get("d")]
        bands = [item["d"] for item in chart.marks.get("mark-area", []) if item.get("d")]
        assert len(lines) == len(bands) == len(next(iter(props["y"].values()))) and all(vertices(line) == epochs for line in lines), (name, lines, bands)
    else:
        raise AssertionError(f"{name}: no check for template {props['template']}")


def any_marks(page: PageReader) -> int:
    return sum(len(items) for chart in page.charts.values() for items in chart.marks.values())


@pytest.mark.slow
@pytest.mark.tier2
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_chart_draws_offline_and_the_cdn_page_draws_nothing(task, tmp_path):
    browser_page = built_page()
    chromium()
    repo = copy_project(tmp_path / "repo", TASK_PARAMS[task])
    run(["dvc", "repro"], repo)
    epochs = len((repo / "metrics/train_history.tsv").read_text().splitlines()) - 1

    # Without the setting (a checkout where set-up has not run) DVC writes its default page.
    assert not (repo / ".dvc/config.local").exists()
    run(["dvc", "plots", "show", "-o", "cdn_plots"], repo)
    cdn_html = (repo / "cdn_plots/index.html").read_text()
    assert re.search(r"<script src=\"https://[^\"]*vega", cdn_html)

    # With it, as scripts/env.sh leaves a checkout: the same command writes the offline page.
    (repo / offline_plots.OUT_DIR).mkdir()
    shutil.copy(browser_page, repo / offline_plots.OUT_DIR / offline_plots.PAGE)
    offline_plots.configure(repo)
    shown = run(["dvc", "plots", "show"], repo)
    page_file = repo / "dvc_plots/index.html"
    assert page_file.as_uri() in shown.stdout
    assert not re.search(r"<script[^>]*\bsrc=", page_file.read_text())

    page = read_page(dump_dom(page_file.as_uri(), tmp_path / "profile"))
    plots = vega_plots(repo)
    assert set(page.charts) == set(plots) - NOT_DRAWN[task]
    for name, chart in page.charts.items():
        check_drew(chart, name, plots[name], repo, epochs)
    assert page.not_drawn is not None and page.not_drawn.split(": ", 1)[1].split(", ") == [name for name in plots if name in NOT_DRAWN[task]]

    # Negative control: DVC's default page under the same flags cannot load Vega, so nothing draws.
    cdn = read_page(dump_dom((repo / "cdn_plots/index.html").as_uri(), tmp_path / "profile"))
    assert all(f"vegaEmbed('#{name}', spec)" in cdn_html for name in page.charts)  # the same charts, asked for
    assert any_marks(cdn) == 0 and not cdn.charts


class ScriptServer(http.server.ThreadingHTTPServer):
    """Serves the checked scripts on 127.0.0.1 and counts requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.count = files, 0
        super().__init__(("127.0.0.1", 0), ScriptHandler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's socket.getfqdn(): a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class ScriptHandler(http.server.BaseHTTPRequestHandler):
    server: ScriptServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.server.count += 1
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/javascript")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
        pass


def test_network_flags_block_even_loopback_and_the_page_drops_empty_plots(tmp_path):
    """DVC's default page shape with its script URLs on a loopback server: it draws with the network
    on and draws nothing, with no request made, under NETWORK_OFF. The offline page, filled as
    DVC fills it, draws the chart and leaves out the plot whose spec is empty."""
    page_path = built_page()
    chromium()
    folder = page_path.parent
    files = {f"/{pin.package}.js": (folder / offline_plots.script_name(pin)).read_bytes() for pin in offline_plots.read_pins()}
    spec = '{"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"values": [{"a": "x", "b": 1}, {"a": "y", "b": 2}]}, "mark": "bar", "encoding": {"x": {"field": "a", "type": "nominal", "title": "letter"}, "y": {"field": "b", "type": "quantitative", "title": "count"}}}'

    def divs(options: str = "") -> str:  # as DVC writes them; `options` asks the plain vega-embed for SVG
        return "".join(f'<div id = "{name}"><script type = "text/javascript">var spec = {body}; vegaEmbed(\'#{name}\', spec{options});</script></div>\n' for name, body in (("bars", spec), ("empty", "{}")))

    server = ScriptServer(files)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        scripts = "".join(f'<script src="http://127.0.0.1:{server.server_port}{path}"></script>' for path in files)
        loopback = tmp_path / "loopback.html"
        body = divs(", {renderer: 'svg'}")
        loopback.write_text(f"<!DOCTYPE html><html><head>{scripts}</head><body>{body}</body></html>")
        blocked = read_page(dump_dom(loopback.as_uri(), tmp_path / "profile"))
        assert server.count == 0 and any_marks(blocked) == 0
        allowed = read_page(dump_dom(loopback.as_uri(), tmp_path / "profile", network=True))
        assert server.count == len(files) and len(allowed.charts["bars"].marks["mark-rect"]) == 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    filled = tmp_path / "offline.html"
    filled.write_text(page_path.read_text().replace("{refresh_tag}", "").replace("{plot_divs}", divs()))
    offline = read_page(dump_dom(filled.as_uri(), tmp_path / "profile"))
    assert set(offline.charts) == {"bars"} and len(offline.charts["bars"].marks["mark-rect"]) == 2
    assert offline.charts["bars"].axis_titles == ["letter", "count"]
    assert offline.not_drawn == "Not drawn (no data in the revisions shown): empty"
