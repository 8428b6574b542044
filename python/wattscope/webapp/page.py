"""The one HTML page of the web app, shared by the server and the report: ``static/index.html`` with ``app.css`` and
``app.js`` inlined, and, for a report, the payload inlined as JSON (so the file works from ``file://``)."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

_CSS_MARK = "/*WATTSCOPE_CSS*/"
_JS_MARK = "/*WATTSCOPE_JS*/"
_DATA_MARK = "<!--WATTSCOPE_DATA-->"


def _static(name: str) -> str:
    return resources.files("wattscope.webapp").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def payload_json(payload: dict[str, Any]) -> str:
    """The payload as strict JSON (no NaN: the payload holds None for a missing number)."""
    return json.dumps(payload, allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def render(payload: dict[str, Any] | None = None) -> str:
    """The page. Without a payload it fetches ``api/data`` from the server that serves it; with one it is
    self-contained. Assets are inlined in both cases so that the server and the report cannot show different pages."""
    html = _static("index.html")
    for mark in (_CSS_MARK, _JS_MARK, _DATA_MARK):
        if html.count(mark) != 1:
            raise RuntimeError(f"static/index.html must hold {mark} exactly once (the package's files are damaged)")
    data = ""
    if payload is not None:
        # "<" escaped so that no string in the data can close the script element; JSON.parse reads it back.
        text = payload_json(payload).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        data = f'<script type="application/json" id="wattscope-data">{text}</script>'
    # One pass over the template: what is put in is never searched again, so data holding a mark stays data.
    parts = {_CSS_MARK: _static("app.css"), _JS_MARK: _static("app.js"), _DATA_MARK: data}
    return re.sub("|".join(re.escape(mark) for mark in parts), lambda m: parts[m.group(0)], html)
