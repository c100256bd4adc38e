"""An offline page for `dvc plots show` / `dvc plots diff`.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so every chart is blank on a
machine without internet. This tool fetches the three packages with `npm pack` at the versions in
tools/offline_plots.pins, checks each script against its pinned SHA-256, and writes an HTML
template with the scripts inlined to .offline-plots/page.html (git-ignored; the checked scripts
lie beside it). It then points `plots.html_template` at that file in .dvc/config.local
(git-ignored too): a setting in the committed .dvc/config would name a file that a fresh clone
does not have, and DVC 3.67 stops with "HTML template has to contain '{plot_divs}'" when the
template file is missing. Without the setting DVC uses its default (CDN) page.

scripts/env.sh runs `python -m tools.offline_plots` on every set-up. A stamp (the SHA-256 of the
pins file and of this module) makes the call a no-op when the page is current. A failure prints
one line, removes the page and the setting (so DVC falls back to its own page) and exits 2.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PINS = Path(__file__).with_suffix(".pins")
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ".offline-plots"
PAGE = "page.html"
STAMP = "stamp"
# DVC reads plots.html_template relative to the .dvc/ folder.
CONFIG_KEY = "plots.html_template"
CONFIG_VALUE = f"../{OUT_DIR}/{PAGE}"
NPM_TIMEOUT_S = 120
# DVC fills the template with str.replace on these; a script that contained one would be edited.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
# Inside <script>, "</script" ends the element early and "<!--" changes how the HTML parser reads it.
UNSAFE_IN_SCRIPT = ("</script", "<!--")

# DVC's plot divs call vegaEmbed("#id", spec). DVC writes the spec {} for a plot that has no data in
# the revisions shown (a regression run's confusion matrix, for example): that div is removed and
# named in one line at the end of the page instead of showing an empty chart. Charts render as SVG.
WRAPPER = """
(function () {
    var embed = window.vegaEmbed;
    var notDrawn = [];
    window.vegaEmbed = function (target, spec, options) {
        var element = typeof target === "string" ? document.querySelector(target) : target;
        if (!spec || Object.keys(spec).length === 0) {
            notDrawn.push(element.id);
            element.remove();
            return Promise.resolve(null);
        }
        return embed(element, spec, Object.assign({renderer: "svg"}, options));
    };
    document.addEventListener("DOMContentLoaded", function () {
        if (notDrawn.length) {
            var note = document.getElementById("tapework-not-drawn");
            note.textContent = "Not drawn (no data in the revisions shown): " + notDrawn.join(", ");
            note.hidden = false;
        }
    });
})();
"""

STYLE = """
        table { border-spacing: 15px; }
        #tapework-not-drawn { color: #555; font-family: sans-serif; font-size: 13px; }
"""


class FetchError(Exception):
    """A one-line reason why the page could not be built."""


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    file: str  # path inside the package, e.g. build/vega.min.js
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


def script_name(pin: Pin) -> str:
    """The checked script's file name in .offline-plots/, e.g. vega-5.33.1.min.js."""
    return f"{pin.package}-{pin.version}.min.js"


def _shown(path: Path) -> str:
    """A path for messages: relative to the checkout when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def read_pins(path: Path = PINS) -> list[Pin]:
    pins = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 4 or len(words[3]) != 64:
            raise FetchError(f"{_shown(path)}:{number}: expected `package version file sha256`, got {line.strip()!r}")
        pins.append(Pin(*words))
    if not pins:
        raise FetchError(f"{_shown(path)} pins no package")
    return pins


def stamp_value(pins_path: Path = PINS) -> str:
    """What the page was built from: the pins and this module (which holds the page's skeleton)."""
    digest = hashlib.sha256()
    for path in (pins_path, Path(__file__)):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _config_local(root: Path) -> Path:
    return root / ".dvc" / "config.local"


def configured(root: Path) -> bool:
    """Whether .dvc/config.local sets plots.html_template to this tool's page (the line `dvc config` writes)."""
    path = _config_local(root)
    return path.is_file() and any(line.strip() == f"html_template = {CONFIG_VALUE}" for line in path.read_text().splitlines())


def page_is_current(root: Path = ROOT, pins_path: Path = PINS) -> bool:
    """Whether root's page exists and was built from the current pins and code."""
    out = root / OUT_DIR
    return (out / PAGE).is_file() and (out / STAMP).is_file() and (out / STAMP).read_text().strip() == stamp_value(pins_path)


def is_current(root: Path = ROOT, pins_path: Path = PINS) -> bool:
    return page_is_current(root, pins_path) and configured(root)


def _npm_error(stderr: str) -> str:
    """The telling part of npm's error output, on one line."""
    prefixes = ("npm error ", "npm ERR! ")
    lines = [line.strip() for line in stderr.splitlines()]
    messages = [line[len(prefix):].strip() for line in lines for prefix in prefixes if line.startswith(prefix)]
    messages = [message for message in messages if message and "A complete log of this run" not in message]
    # npm's "code E..." line, then its first sentence (skipping the syscall/errno detail lines).
    codes = [message for message in messages if message.startswith("code ")]
    sentences = [message for message in messages if re.match(r"(code|syscall|errno|path|dest|type|signal) \S+$", message) is None]
    text = "; ".join(codes[:1] + sentences[:1]) or next((line for line in reversed(lines) if line), "no output")
    return text[:300]


def fetch_scripts(pins: list[Pin], workdir: Path, npm: str = "npm", pins_path: Path = PINS) -> list[tuple[Pin, bytes]]:
    """`npm pack` every pinned package into `workdir`, then each pinned file, checked against its SHA-256."""
    executable = shutil.which(npm)
    if executable is None:
        raise FetchError(f"`{npm}` is not on PATH: install Node.js with npm and rerun scripts/env.sh")
    specs = [pin.spec for pin in pins]
    # --prefer-offline: a tarball already in npm's cache is used without a request.
    command = [executable, "pack", *specs, "--pack-destination", str(workdir), "--prefer-offline", "--fetch-retries=1", "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000", "--fetch-timeout=30000", "--loglevel=error"]
    try:
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"`npm pack {' '.join(specs)}` did not finish in {NPM_TIMEOUT_S} s: is the npm registry (or its mirror) reachable?") from None
    if result.returncode != 0:
        raise FetchError(f"`npm pack {' '.join(specs)}` failed (exit {result.returncode}): {_npm_error(result.stderr)}")
    scripts = []
    for pin in pins:
        tarball = workdir / f"{pin.package}-{pin.version}.tgz"
        if not tarball.is_file():
            raise FetchError(f"`npm pack {pin.spec}` wrote no {tarball.name}")
        with tarfile.open(tarball) as archive:
            try:
                member = archive.extractfile(f"package/{pin.file}")
            except KeyError:
                member = None
            if member is None:
                raise FetchError(f"{pin.spec} has no {pin.file}: fix the file name in {_shown(pins_path)}")
            data = member.read()
        actual = hashlib.sha256(data).hexdigest()
        if actual != pin.sha256:
            raise FetchError(f"{pin.file} of {pin.spec} has SHA-256 {actual}, {_shown(pins_path)} pins {pin.sha256}: not inlining a file that differs from the pin")
        scripts.append((pin, data))
    return scripts


def page_html(scripts: list[tuple[Pin, bytes]]) -> str:
    """The template for DVC: the scripts inlined, DVC's {refresh_tag} and {plot_divs}, and no {scripts}
    (where DVC would put its CDN <script> tags)."""
    sources = []
    for pin, data in scripts:
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError(f"{pin.file} of {pin.spec} is not UTF-8 text and cannot be inlined into the page") from None
        sources.append(source)
        lowered = source.lower()
        for text in (*PLACEHOLDERS, *UNSAFE_IN_SCRIPT):
            if text in lowered:
                raise FetchError(f"{pin.file} of {pin.spec} contains {text!r} and cannot be inlined into the page")
    versions = ", ".join(f"{pin.package} {pin.version}" for pin, _ in scripts)
    parts = [
        "<!DOCTYPE html>\n<html>\n<head>\n    <meta charset=\"utf-8\">\n    {refresh_tag}\n    <title>DVC Plot</title>\n",
        f"    <!-- Offline page: {versions} inlined by tools/offline_plots.py (pins: tools/{PINS.name}) -->\n",
    ]
    parts += [f"    <script>\n{source}\n    </script>\n" for source in sources]
    parts += [f"    <script>{WRAPPER}    </script>\n", f"    <style>{STYLE}    </style>\n"]
    parts.append("</head>\n<body>\n    {plot_divs}\n    <p id=\"tapework-not-drawn\" hidden></p>\n</body>\n</html>\n")
    return "".join(parts)


def _dvc_config(root: Path, *arguments: str) -> None:
    result = subprocess.run([sys.executable, "-m", "dvc", "config", "--local", *arguments], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`dvc config --local {' '.join(arguments)}` failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")


def configure(root: Path) -> None:
    """Point DVC at the page (in .dvc/config.local, which git ignores)."""
    if not configured(root):
        _dvc_config(root, CONFIG_KEY, CONFIG_VALUE)


def unconfigure(root: Path) -> None:
    """Remove the page and the setting, so DVC uses its default page rather than a missing file."""
    shutil.rmtree(root / OUT_DIR, ignore_errors=True)
    if configured(root):
        _dvc_config(root, "--unset", CONFIG_KEY)


def ensure(root: Path = ROOT, pins_path: Path = PINS, npm: str = "npm") -> str | None:
    """Build the page and configure DVC unless current. Returns a line to print, None when nothing was done."""
    if page_is_current(root, pins_path):
        if configured(root):
            return None
        configure(root)
        return f"offline plots: {CONFIG_KEY} set to {CONFIG_VALUE} in .dvc/config.local"
    pins = read_pins(pins_path)
    with tempfile.TemporaryDirectory(prefix="offline-plots-") as workdir:
        scripts = fetch_scripts(pins, Path(workdir), npm, pins_path)
    page = page_html(scripts)
    out = root / OUT_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for pin, data in scripts:  # the checked files themselves, beside the page: `sha256sum` them against the pins
        (out / script_name(pin)).write_bytes(data)
    partial = out / f"{PAGE}.partial"
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, out / PAGE)
    configure(root)
    (out / STAMP).write_text(stamp_value(pins_path) + "\n")
    versions = ", ".join(pin.spec for pin in pins)
    return f"offline plots: {versions} inlined into {OUT_DIR}/{PAGE} ({len(page.encode()) // 1024} KiB); `dvc plots show/diff` use it"


def main(root: Path = ROOT, pins_path: Path = PINS, npm: str = "npm") -> int:
    """`python -m tools.offline_plots`: 0 when the page is current (or now built), 2 after one line on why not."""
    try:
        message = ensure(root, pins_path, npm)
    except FetchError as error:
        try:
            unconfigure(root)
        except FetchError:
            pass
        print(f"offline plots: {error}; `dvc plots` falls back to DVC's default page, which loads Vega from the web", file=sys.stderr)
        return 2
    if message:
        print(message, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
