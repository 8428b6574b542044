"""The web app without a browser: the payload on the synthetic database (known answers), the filters, the server's
endpoints on an ephemeral port, the report file, and bad databases (a one-line error and exit 2, or an error the
page shows)."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope import cli  # noqa: E402
from wattscope.analysis import (  # noqa: E402
    BAND_COLOURS,
    BAND_EDGES,
    SCORE_VERSION,
    ResultsError,
    load_results,
    pareto_frontier,
    score_formula,
    select_slice,
    shipped_database,
    synthetic_database,
)
from wattscope.analysis.synthetic import PLANTED  # noqa: E402
from wattscope.sweep.store import SCHEMA_VERSION, SweepStore  # noqa: E402
from wattscope.webapp import page  # noqa: E402
from wattscope.webapp.payload import TABLE_COLUMNS, RowFilter, build_payload, parse_kernels, table_csv  # noqa: E402
from wattscope.webapp.server import make_server  # noqa: E402

N_MODELS = 24

KERNELS = {
    "kernels": [
        {"name": "sm90_xmma_gemm_bf16", "calls": 120, "time_s": 0.8, "energy_j": 300.0, "share": 0.6},
        {"name": "elementwise_add", "calls": 300, "time_s": 0.2, "energy_j": 50.0, "share": 0.1},
        {"name": "softmax_warp_forward", "calls": 60, "time_s": 0.3, "energy_j": 150.0, "share": 0.3},
    ],
    "power": {"t_s": [0.0, 0.02, 0.04, 0.06], "power_w": [300.0, 610.0, 640.0, 320.0]},
}


@pytest.fixture(scope="module")
def synthetic_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic database with kernel data stored on its first result (the sweep leaves kernels_json empty)."""
    return synthetic_database(tmp_path_factory.mktemp("webapp") / "synthetic.sqlite", n_models=N_MODELS, seed=3,
                              first_kernels=KERNELS)


@pytest.fixture(scope="module")
def payload(synthetic_db: Path) -> dict:
    return build_payload(synthetic_db)


def copy_db(src: Path, dst: Path) -> Path:
    conn = sqlite3.connect(src)
    out = sqlite3.connect(dst)
    conn.backup(out)  # a consistent copy of a WAL database, its -wal included
    conn.close()
    out.close()
    return dst


# --- payload ------------------------------------------------------------------------------------------------------


def test_payload_rows_match_the_database(payload: dict, synthetic_db: Path) -> None:
    df = load_results(synthetic_db)
    rows = payload["rows"]
    assert len(rows) == len(df) > 2 * N_MODELS  # fp32 and bf16 of every model, plus other methods
    assert [r["id"] for r in rows] == list(range(len(rows)))
    assert [r["unit_key"] for r in rows] == list(df["unit_key"])
    assert [r["energy_per_image_j"] for r in rows] == pytest.approx(list(df["energy_per_image_j"]))
    assert payload["columns"] == list(TABLE_COLUMNS)
    assert all(set(TABLE_COLUMNS) <= set(r) for r in rows)
    assert all(r["plotted"] for r in rows)  # every synthetic model is a timm unit with an accuracy
    assert payload["source"]["gpus"] == ["Synthetic H100 (planted answers)"]
    assert payload["source"]["meta"]["schema_version"] == str(SCHEMA_VERSION)
    # Strict JSON: no NaN anywhere.
    json.loads(page.payload_json(payload))


def test_payload_frontier_fit_and_score_per_slice(payload: dict, synthetic_db: Path) -> None:
    df = load_results(synthetic_db)
    reference = payload["slices"][0]
    assert reference["key"] == "Synthetic H100 (planted answers)|bs64|bf16|cl0|comp0|graph0"
    # The reference slice's frontier is pareto_frontier of those rows, in the same order (by energy).
    expected = list(pareto_frontier(select_slice(df)).index)
    assert reference["frontier"] == expected
    energies = [payload["rows"][i]["energy_per_image_j"] for i in reference["frontier"]]
    assert energies == sorted(energies)
    assert all(payload["rows"][i]["on_frontier"] for i in reference["frontier"])
    # The planted frontier is double-exponential: the fit says so and its curve passes through the planted one.
    fit = reference["fit"]
    assert fit["best"] == "double_exponential"
    assert len(fit["curve"]["top1"]) == 200
    for a, e in zip(fit["curve"]["top1"][::40], fit["curve"]["energy_per_image_j"][::40], strict=True):
        assert e == pytest.approx(float(PLANTED.frontier_energy_j(a)), rel=0.1)
    # A row is scored against its own slice's fit: a frontier row has ratio near 1, band A.
    on = payload["rows"][reference["frontier"][len(expected) // 2]]
    assert on["ratio"] == pytest.approx(1.0, abs=0.1) and on["band"] == "A"
    assert payload["score"] == {
        "version": SCORE_VERSION,
        "formula": score_formula(),
        "bands": ["A", "B", "C", "D", "E", "F", "G"],
        "band_edges": list(BAND_EDGES),
        "band_colours": BAND_COLOURS,  # the figures' colours: the page has no copy of its own
    }
    assert all(r["score_version"] == SCORE_VERSION for r in payload["rows"])


BOARD_2 = "GPU-22222222-0000-0000-0000-000000000000"


def copy_rows(db: Path, where: str, factor: float, **set_columns: str) -> None:
    """Copy the results matching ``where`` with energies times ``factor`` and ``set_columns`` (e.g. another
    ``gpu_uuid``: a second board) replaced."""
    conn = sqlite3.connect(db)
    with conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(results)") if r[1] != "id"]
        values = ["?" if c in set_columns else f"{c} * {factor}" if c in ("energy_per_image_j",
                  "energy_per_image_ci95_j") else c for c in columns]
        params = [set_columns[c] for c in columns if c in set_columns]
        conn.execute(f"INSERT INTO results ({', '.join(columns)}) SELECT {', '.join(values)} FROM results "
                     f"WHERE {where}", params)
    conn.close()


def test_payload_counts_a_model_on_two_boards_once_as_analyze_does(synthetic_db: Path, tmp_path: Path) -> None:
    import argparse

    from wattscope.analysis.command import _report

    # Board 2 repeats the reference slice and reads 20 % less: every copy is cheaper than its board-1 row, so a
    # frontier of single rows would be board 2's, and a per-row score would differ between the boards.
    db = copy_db(synthetic_db, tmp_path / "boards.sqlite")
    copy_rows(db, "precision = 'bf16' AND batch_size = 64 AND channels_last = 0 AND compile = 0 AND cuda_graphs = 0",
              0.8, gpu_uuid=BOARD_2)
    data = build_payload(db)
    reference = data["slices"][0]
    assert reference["key"] == "Synthetic H100 (planted answers)|bs64|bf16|cl0|comp0|graph0"
    args = argparse.Namespace(db=str(db), precision=None, batch_size=None, gpu=None, channels_last=None,
                              compile=None, cuda_graphs=None, top=3)
    report = _report(args)
    df = load_results(db)
    first_rows = df[~df.duplicated(["gpu_name", "unit_key", "config_key"])].index
    # The page's frontier is the fit's: one point per model, under its first (board-1) row's id.
    assert len(reference["frontier"]) == len(report["fit"]["frontier"]) == reference["fit"]["forms"][0]["n"]
    assert set(reference["frontier"]) <= set(first_rows)
    assert [data["rows"][i]["unit_key"] for i in reference["frontier"]] == [
        p["unit_key"] for p in report["fit"]["frontier"]]
    # Both boards' rows of a model carry the command's one score for that model.
    by_unit = {s["unit_key"]: s for s in report["scores"]}
    rows = [r for r in data["rows"] if r["slice"] == reference["key"]]
    assert len(rows) == 2 * len(by_unit) == 2 * N_MODELS
    for r in rows:
        assert r["band"] == by_unit[r["unit_key"]]["band"], r["unit_key"]
        assert r["ratio"] == pytest.approx(by_unit[r["unit_key"]]["ratio"], rel=1e-12), r["unit_key"]


def test_payload_savings_carry_the_planted_answers(payload: dict) -> None:
    by_family = payload["savings"]["by_family"]
    assert by_family["methods"][:2] == ["bf16", "fp16"]
    overall = by_family["families"][0]
    assert overall["family"] == "all"
    assert overall["values"]["bf16"]["saving_frac"] == pytest.approx(PLANTED.savings["bf16"], abs=0.01)
    assert overall["values"]["bf16"]["n_models"] == N_MODELS
    assert overall["values"]["bf16"]["helps"] is True
    row = payload["rows"][0]
    savings = payload["savings"]["by_unit"][f"{row['gpu_name']}|{row['unit_key']}"]
    bf16 = next(s for s in savings if s["method"] == "bf16")
    assert bf16["saving_frac"] == pytest.approx(PLANTED.savings["bf16"], abs=0.02)
    assert bf16["ci95_low"] < bf16["saving_frac"] < bf16["ci95_high"]


def test_payload_savings_per_gpu_model(synthetic_db: Path, tmp_path: Path) -> None:
    # A second GPU model on which bf16 saves less: its rows are the first's with bf16 energies 1.5 times higher.
    db = copy_db(synthetic_db, tmp_path / "two_gpus.sqlite")
    copy_rows(db, "precision = 'fp32'", 1.0, gpu_name="Other GPU", gpu_uuid=BOARD_2)
    copy_rows(db, "precision = 'bf16'", 1.5, gpu_name="Other GPU", gpu_uuid=BOARD_2)
    families = build_payload(db)["savings"]["by_family"]["families"]
    assert [(f["gpu_name"], f["family"]) for f in families if f["family"] == "all"] == [
        ("Other GPU", "all"), ("Synthetic H100 (planted answers)", "all")]
    assert families[0]["family"] == "all"  # each GPU's summary above its families
    by_gpu = {f["gpu_name"]: f["values"]["bf16"] for f in families if f["family"] == "all"}
    planted = PLANTED.savings["bf16"]
    assert by_gpu["Synthetic H100 (planted answers)"]["saving_frac"] == pytest.approx(planted, abs=0.01)
    assert by_gpu["Other GPU"]["saving_frac"] == pytest.approx(1 - 1.5 * (1 - planted), abs=0.01)
    assert by_gpu["Other GPU"]["n_models"] == by_gpu["Synthetic H100 (planted answers)"]["n_models"] == N_MODELS


def test_payload_kernels_and_power_timeline(payload: dict) -> None:
    with_kernels = payload["rows"][0]  # the results table's id 1
    assert [k["name"] for k in with_kernels["kernels"]] == [
        "sm90_xmma_gemm_bf16", "softmax_warp_forward", "elementwise_add"]  # largest energy first
    assert with_kernels["power"] == KERNELS["power"]
    assert with_kernels["kernels_note"] is None
    assert all(r["kernels"] is None and r["power"] is None for r in payload["rows"][1:])


@pytest.mark.parametrize(
    ("text", "kernels", "has_power", "note"),
    [
        (None, None, False, None),
        ("", None, False, None),
        ('[{"name": "k", "energy_j": 2.0}, {"name": "j", "energy_j": 3.0}]', ["j", "k"], False, None),
        ("{not json", None, False, "not JSON"),
        ('[{"energy_j": 1.0}]', None, False, "unreadable"),
        ('{"kernels": [], "power": {"t_s": [0, 1], "power_w": [5, 6]}}', None, True, None),
        ('{"kernels": [], "power": {"t_s": [0, 1], "power_w": [5]}}', None, False, "power timeline"),
    ],
)
def test_parse_kernels(text: str | None, kernels: list[str] | None, has_power: bool, note: str | None) -> None:
    got_kernels, power, got_note = parse_kernels(text)
    assert (None if got_kernels is None else [k["name"] for k in got_kernels]) == kernels
    assert (power is not None) == has_power
    assert (got_note is None) if note is None else (note in got_note)


# --- filters and the table ----------------------------------------------------------------------------------------


ROWS = [
    {"family": "resnet", "architecture": "resnet50", "unit_key": "resnet50@224", "params_m": 25.6,
     "precision": "bf16", "batch_size": 64, "gpu_name": "H100"},
    {"family": "vit", "architecture": "vit_small", "unit_key": "vit_small@224", "params_m": 22.0,
     "precision": "fp32", "batch_size": 1, "gpu_name": "H100"},
    {"family": "vit", "architecture": "vit_large", "unit_key": "vit_large@224", "params_m": None,
     "precision": "bf16", "batch_size": 64, "gpu_name": "A100"},
]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["resnet50", "vit_small", "vit_large"]),
        ("family=vit", ["vit_small", "vit_large"]),
        ("family=vit&family=resnet", ["resnet50", "vit_small", "vit_large"]),
        ("params_min=23", ["resnet50"]),  # a row without a parameter count fails a bound
        ("params_max=23", ["vit_small"]),
        ("precision=bf16", ["resnet50", "vit_large"]),
        ("precision=", []),  # nothing allowed
        ("batch=1&batch=256", ["vit_small"]),
        ("gpu=A100", ["vit_large"]),
        ("q=VIT+large", ["vit_large"]),
        ("q=h100+bf16", ["resnet50"]),
        ("family=vit&precision=bf16&q=large", ["vit_large"]),
    ],
)
def test_row_filter(query: str, expected: list[str]) -> None:
    assert [r["architecture"] for r in RowFilter.from_query(query).apply(ROWS)] == expected


@pytest.mark.parametrize("query", ["params_min=abc", "params_max=inf", "colour=red"])
def test_row_filter_rejects_bad_queries(query: str) -> None:
    with pytest.raises(ValueError):
        RowFilter.from_query(query)


def test_table_csv() -> None:
    rows = [{"a": 1.5, "b": True, "c": None, "d": 'say "hi", then go'}]
    text = table_csv(rows, ["a", "b", "c", "d"])
    assert list(csv.reader(io.StringIO(text))) == [["a", "b", "c", "d"], ["1.5", "1", "", 'say "hi", then go']]


# --- the report ---------------------------------------------------------------------------------------------------


def test_report_is_self_contained(synthetic_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "report.html"
    assert cli.main(["report", str(synthetic_db), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    html = out.read_text(encoding="utf-8")
    # Nothing loaded from elsewhere: no external scripts, styles or fetches but the server-only ones.
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")
    start = html.index('<script type="application/json" id="wattscope-data">') + len(
        '<script type="application/json" id="wattscope-data">')
    data = json.loads(html[start:html.index("</script>", start)])
    assert len(data["rows"]) == len(load_results(synthetic_db))
    assert data["score"]["formula"] == score_formula()
    # The database's name, never where it lives on the author's machine.
    assert data["source"]["db"] == synthetic_db.name
    assert str(synthetic_db.parent) not in html and str(synthetic_db.resolve().parent) not in html


def test_report_into_a_folder_is_one_clear_line(
    synthetic_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(synthetic_db), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"wattscope report: error: cannot write {tmp_path}: {tmp_path} is a folder: give the report's "
                   f"file name, e.g. {tmp_path / 'report.html'}")
    assert list(tmp_path.iterdir()) == [] and not tmp_path.with_name(tmp_path.name + ".tmp").exists()


def test_page_escapes_the_data() -> None:
    html = page.render({"rows": [{"architecture": "</script><script>alert(1)</script>"}]})
    assert html.count("</script>") == 2  # the data's and the app's; none from the string
    assert "\\u003c/script\\u003e" in html


def test_page_data_holding_a_mark_stays_data() -> None:
    names = ["/*WATTSCOPE_JS*/ GPU", "/*WATTSCOPE_CSS*/", "<!--WATTSCOPE_DATA-->"]
    html = page.render({"rows": [{"gpu_name": n} for n in names]})
    start = html.index('id="wattscope-data">') + len('id="wattscope-data">')
    data = json.loads(html[start:html.index("</script>", start)])
    assert [r["gpu_name"] for r in data["rows"]] == names
    clean = page.render({"rows": []})
    # The app's script and style appear once each, as in a page without such data.
    assert html.count("function savingsNode") == clean.count("function savingsNode") == 1
    assert html.count("</style>") == clean.count("</style>")


def _js_function(source: str, name: str) -> str:
    """The text of ``function name(...) {...}`` in ``source`` (braces counted; app.js has none in its strings)."""
    start = source.index(f"function {name}(")
    depth, i = 0, source.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        i += 1
        if depth == 0:
            return source[start:i]


def test_page_summarises_pairs_of_boards_by_their_geometric_mean(tmp_path: Path) -> None:
    """The comparison panel's line for one method measured on several pairs of boards, by app.js's own functions
    (run in node: the browser tests need chromium)."""
    import shutil

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    app = (Path(page.__file__).parent / "static" / "app.js").read_text(encoding="utf-8")
    pairs = [{"method": "bf16", "from_config": "a", "to_config": "b", "saving_frac": f, "ci95_low": f - 0.01,
              "ci95_high": f + 0.01} for f in (0.10, 0.12, 0.50)]
    script = "\n".join([
        _js_function(app, "isNum"), _js_function(app, "fmtPct"), _js_function(app, "savingsNode"),
        "function el(tag, attrs, children) { return { tag: tag, attrs: attrs, children: children }; }",
        f"var state = {{ data: {{ savings: {{ by_unit: {{ 'G|m@224': {json.dumps(pairs)} }} }} }} }};",
        "var node = savingsNode({ gpu_name: 'G', unit_key: 'm@224' });",
        "console.log(JSON.stringify(node.children.map(function (li) { return li.attrs.text; })));",
    ])
    (tmp_path / "t.js").write_text(script, encoding="utf-8")
    out = subprocess.run([node, str(tmp_path / "t.js")], capture_output=True, text=True, timeout=30, check=True)
    geometric = 1 - (0.90 * 0.88 * 0.50) ** (1 / 3)  # 26.6 %; the median would be 12 %
    assert json.loads(out.stdout) == [
        f"bf16: {round(100 * geometric)} % (geometric mean of 3 pairs of boards, 10 % to 50 %)"]


# --- the server ---------------------------------------------------------------------------------------------------


class Running:
    def __init__(self, db: Path) -> None:
        self.server = make_server(db, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = self.server.url

    def get(self, path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def running(synthetic_db: Path, tmp_path: Path):
    server = Running(copy_db(synthetic_db, tmp_path / "served.sqlite"))
    yield server
    server.close()


def test_server_endpoints(running: Running, payload: dict) -> None:
    assert running.url.startswith("http://127.0.0.1:") and not running.url.endswith(":0/")
    status, kind, body = running.get("")
    assert status == 200 and kind.startswith("text/html")
    assert b'id="chart"' in body and b'type="application/json"' not in body  # the served page fetches its data
    status, kind, body = running.get("api/data")
    assert status == 200 and kind == "application/json"
    data = json.loads(body)
    assert len(data["rows"]) == len(payload["rows"])
    assert data["slices"][0]["frontier"] == payload["slices"][0]["frontier"]
    status, _, body = running.get("api/status")
    assert status == 200 and json.loads(body) == {"ok": True, "version": data["server"]["version"], "error": None}
    assert running.get("nope")[0] == 404
    assert running.get("api/table.csv?params_min=x")[0] == 400


def test_server_csv_is_filtered(running: Running, payload: dict) -> None:
    query = "precision=bf16&batch=64&q=net"
    status, kind, body = running.get("api/table.csv?" + query)
    assert status == 200 and kind.startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(body.decode())))
    expected = RowFilter.from_query(query).apply(payload["rows"])
    assert 0 < len(table) == len(expected) < len(payload["rows"])
    assert [r["config_key"] for r in table] == [r["config_key"] for r in expected]
    assert all(r["precision"] == "bf16" and r["batch_size"] == "64" and "net" in r["unit_key"] for r in table)
    assert list(table[0]) == list(TABLE_COLUMNS)


def test_server_head_is_get_without_the_body(running: Running) -> None:
    request = urllib.request.Request(running.url + "api/data", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        length = int(r.headers["Content-Length"])
        assert r.read() == b""
    assert length == len(running.get("api/data")[2]) > 0
    # The server still answers on that connection's heels: HEAD sent no stray body.
    assert running.get("api/status")[0] == 200


class _GoneClient(io.RawIOBase):
    """A response stream whose client has hung up: every write fails as a closed socket does."""

    def __init__(self) -> None:
        self.writes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("path", ["/api/data", "/nope"])
def test_server_lets_a_client_that_hung_up_go_quietly(
    running: Running, path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from wattscope.webapp.server import _Handler

    handler = _Handler.__new__(_Handler)  # without a socket: the response goes to a client that is gone
    handler.server = running.server
    handler.client_address = ("127.0.0.1", 1)
    handler.command, handler.path, handler.request_version = "GET", path, "HTTP/1.1"
    handler.requestline = f"GET {path} HTTP/1.1"
    handler.wfile = _GoneClient()
    handler.do_GET()  # no exception escapes
    assert handler.wfile.writes == 1  # no second answer (a 500) written onto the dead socket
    assert handler.close_connection
    assert "Traceback" not in capsys.readouterr().err


def test_server_shows_a_database_that_breaks_and_recovers(running: Running) -> None:
    db = running.server.source.db_path
    version = json.loads(running.get("api/status")[2])["version"]
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    status, kind, body = running.get("api/data")
    assert status == 503 and kind == "application/json"
    assert "schema version 99" in json.loads(body)["error"]
    status_body = json.loads(running.get("api/status")[2])
    assert status_body["ok"] is False and "schema version 99" in status_body["error"]
    assert running.get("api/table.csv")[0] == 503
    with conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    assert running.get("api/data")[0] == 200
    assert json.loads(running.get("api/status")[2])["version"] != version  # the file changed: the page says reload
    db.unlink()
    Path(f"{db}-wal").unlink(missing_ok=True)
    status, _, body = running.get("api/data")
    assert status == 503 and "no sweep database" in json.loads(body)["error"]


def test_server_survives_an_unexpected_error(
    running: Running, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wattscope.webapp.server as server_module

    def fails(path: Path) -> dict:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server_module, "build_payload", fails)
    db = running.server.source.db_path
    st = db.stat()
    os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed: the payload is rebuilt
    status, _, body = running.get("api/data")
    assert status == 500 and json.loads(body)["error"] == "internal error: RuntimeError: disk on fire"
    err = capsys.readouterr().err
    assert "Traceback" in err and "disk on fire" in err  # in the server's log, not on the page
    monkeypatch.undo()
    assert running.get("api/data")[0] == 200  # the failed build is retried, not remembered as the file's state


# --- bad databases ------------------------------------------------------------------------------------------------


def _bad_databases(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the error must contain)."""
    empty_file = folder / "empty.sqlite"
    empty_file.write_bytes(b"")
    not_sqlite = folder / "notes.sqlite"
    not_sqlite.write_text("these are my notes, not a database\n" * 100)
    no_results = folder / "no_results.sqlite"
    SweepStore(no_results).close()
    version = copy_db(good, folder / "version.sqlite")
    missing = copy_db(good, folder / "missing_column.sqlite")
    with sqlite3.connect(version) as conn:
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    conn.close()
    with sqlite3.connect(missing) as conn:
        conn.execute("ALTER TABLE results DROP COLUMN energy_per_image_j")
    conn.close()
    return {
        "missing file": (folder / "nowhere.sqlite", "no sweep database"),
        "empty file": (empty_file, "not a wattscope sweep database"),
        "not SQLite": (not_sqlite, "not an SQLite database"),
        "no results": (no_results, "no results yet"),
        "schema version": (version, "schema version 7"),
        "missing column": (missing, "energy_per_image_j"),
    }


@pytest.fixture(scope="module")
def bad_databases(synthetic_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return _bad_databases(synthetic_db, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("command", ["serve", "report"])
@pytest.mark.parametrize(
    "name", ["missing file", "empty file", "not SQLite", "no results", "schema version", "missing column"]
)
def test_bad_database_is_one_clear_line_and_exit_2(
    command: str, name: str, bad_databases: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, phrase = bad_databases[name]
    argv = [command, str(path)] + (["--no-browser", "--port", "0"] if command == "serve" else
                                   ["-o", str(tmp_path / "r.html")])
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"wattscope {command}: error: ") and phrase in lines[0]
    assert str(path) in lines[0] or name == "missing column"
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(ResultsError, match=phrase):
        build_payload(path)


def test_bad_database_from_the_real_command(bad_databases: dict) -> None:
    """The installed entry point, in its own process: no traceback reaches the user."""
    path, phrase = bad_databases["schema version"]
    r = subprocess.run([sys.executable, "-m", "wattscope.cli", "serve", str(path), "--no-browser"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and phrase in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_reports_a_busy_port(synthetic_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with make_server(synthetic_db, "127.0.0.1", 0) as busy:
        port = busy.server_address[1]
        assert cli.main(["serve", str(synthetic_db), "--no-browser", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_serve_prints_the_url_and_serves(synthetic_db: Path, tmp_path: Path) -> None:
    """`wattscope serve` as a user runs it: it prints the URL, and the URL answers."""
    db = copy_db(synthetic_db, tmp_path / "s.sqlite")
    proc = subprocess.Popen([sys.executable, "-m", "wattscope.cli", "serve", str(db), "--no-browser", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"wattscope serve: {db} at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "api/status", timeout=10) as r:
            assert json.loads(r.read())["ok"] is True
    finally:
        proc.terminate()
        proc.wait(10)


def test_default_database_is_the_shipped_h100_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # From a checkout (editable install) the repository's data/h100/sweep.sqlite; from a wheel the copy it carries.
    out = tmp_path / "h100.html"
    assert cli.main(["report", "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    start = html.index('id="wattscope-data">') + len('id="wattscope-data">')
    data = json.loads(html[start:html.index("</script>", start)])
    assert data["source"]["db"] == "sweep.sqlite" and len(data["rows"]) == len(load_results(shipped_database()))
    assert "NVIDIA H100 80GB HBM3|bs64|bf16|cl0|comp0|graph0" in html
    assert str(shipped_database().resolve().parent) not in html  # the report names the file, not where it lives
