"""The results file that `wattscope run -o`, the pytest plugin's ``--wattscope-json`` and `wattscope compare` share.

    {"format": "wattscope.results/1", "scope": "...", "regions": {"<region>": [<trial>, ...]}, ...}

A region is something measured repeatedly (a command, a test, a benchmark's rounds); each trial is a flat dict with
unit-bearing keys (``Measurement.to_dict()``, plus ``cpu.*`` keys where RAPL was read). `wattscope compare` also
reads a single ``Measurement.to_json()`` document, or a JSON list of them (grouped by ``name``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomic
from ..measurement import json_safe

FORMAT = "wattscope.results/1"
WHOLE_DEVICE_NOTE = ("whole-device energy: every process using the measured GPUs during a window counts, not only the "
                     "measured code")


class ResultsFileError(ValueError):
    """A file is not a wattscope results file (or a Measurement's JSON): says what was expected."""


def results_document(regions: Mapping[str, Sequence[Mapping[str, object]]], **meta: object) -> dict[str, Any]:
    """A results-file document: ``meta`` keys first (tool, command, ...), then the regions' trials."""
    return json_safe({"format": FORMAT, "scope": WHOLE_DEVICE_NOTE, **meta,
                      "regions": {name: [dict(t) for t in trials] for name, trials in regions.items()}})


def write_results(path: str | Path, regions: Mapping[str, Sequence[Mapping[str, object]]], **meta: object) -> Path:
    path = Path(path)
    write_atomic(path, json.dumps(results_document(regions, **meta), indent=2) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Region name -> trials (flat dicts) from a results file, a Measurement's JSON, or a list of those."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ResultsFileError(f"cannot read {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path} is not JSON ({e})") from e
    if isinstance(doc, dict) and "regions" in doc:
        if doc.get("format") != FORMAT:
            raise ResultsFileError(
                f"{path}: unknown results format {doc.get('format')!r} (this wattscope reads {FORMAT})"
            )
        regions = doc["regions"]
        if not isinstance(regions, dict) or not all(
            isinstance(t, list) and all(isinstance(x, dict) for x in t) for t in regions.values()
        ):
            raise ResultsFileError(f"{path}: 'regions' must map each region to a list of trial objects")
        return {str(k): list(v) for k, v in regions.items()}
    measurements = doc if isinstance(doc, list) else [doc]
    if not measurements or not all(isinstance(m, dict) and "energy_j" in m for m in measurements):
        raise ResultsFileError(
            f"{path} is neither a wattscope results file ({{'format': '{FORMAT}', 'regions': ...}}) nor the JSON of "
            "Measurements (Measurement.to_json())"
        )
    out: dict[str, list[dict[str, Any]]] = {}
    for m in measurements:
        out.setdefault(str(m.get("name") or "measurement"), []).append(m)
    return out
