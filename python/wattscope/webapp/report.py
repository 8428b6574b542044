"""``wattscope report``: the web app's views as one self-contained HTML file (no server, no network: it opens from
``file://``)."""

from __future__ import annotations

from pathlib import Path

from . import page
from .payload import build_payload


def write_report(db_path: str | Path, out_path: str | Path) -> Path:
    """Write the page with the payload of ``db_path`` inlined to ``out_path`` (its folder is created). Raises
    ``wattscope.analysis.ResultsError`` for a database that cannot be read, before anything is written; OSError
    (IsADirectoryError for a folder) when the file cannot be written, leaving nothing behind."""
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: give the report's file name, e.g. {out / 'report.html'}")
    html = page.render(build_payload(db_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(out)  # a reader never sees half a report
    finally:
        tmp.unlink(missing_ok=True)
    return out
