/* wattscope web app: top-1 accuracy against energy per image, in plain JS and inline SVG (no framework, no network
   but the page's own server). The data is either inline (a report file, <script id="wattscope-data">) or fetched
   from the server's api/data. The filter semantics here are mirrored by wattscope.webapp.payload.RowFilter, which
   the server's api/table.csv uses: change both together. */
(function () {
  "use strict";

  var SVG_NS = "http://www.w3.org/2000/svg";
  // Tableau's ten hues, then darker and lighter variants: 30 distinguishable family colours before any repeats.
  var BASE_HUES = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac"];
  var PALETTE = BASE_HUES.concat(BASE_HUES.map(function (c) { return shade(c, -0.35); }),
    BASE_HUES.map(function (c) { return shade(c, 0.45); }));
  var POLL_MS = 15000;

  var state = {
    data: null,
    served: false,
    rows: [],
    byId: new Map(),
    sliceByKey: new Map(),
    familyColor: new Map(),
    filter: null,
    colorBy: "family",
    selected: [],
    visible: [],
    version: null,
  };

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    appendAll(node, children);
    return node;
  }

  function svgEl(tag, attrs, children) {
    var node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    appendAll(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.setAttribute("class", v);
      else node.setAttribute(k, v === true ? "" : String(v));
    });
  }

  function appendAll(node, children) {
    if (children === null || children === undefined) return;
    (Array.isArray(children) ? children : [children]).forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
  }

  function shade(hex, amount) {
    var n = parseInt(hex.slice(1), 16);
    var rgb = [(n >> 16) & 255, (n >> 8) & 255, n & 255].map(function (c) {
      var v = amount < 0 ? c * (1 + amount) : c + (255 - c) * amount;
      return Math.round(v);
    });
    return "#" + rgb.map(function (c) { return c.toString(16).padStart(2, "0"); }).join("");
  }

  function isNum(v) { return typeof v === "number" && isFinite(v); }

  // --- formatting -------------------------------------------------------------------------------------------------

  function sig(v, digits) {
    if (!isNum(v)) return "–";
    if (v === 0) return "0";
    var p = Math.max(0, digits - 1 - Math.floor(Math.log10(Math.abs(v))));
    var text = v.toFixed(Math.min(p, 6));
    return text.indexOf(".") < 0 ? text : text.replace(/\.?0+$/, "");
  }

  function energyUnit(j) {
    var a = Math.abs(j);
    if (a >= 1) return [1, "J"];
    if (a >= 1e-3) return [1e3, "mJ"];
    return [1e6, "µJ"];
  }

  function fmtEnergy(j, ci) {
    if (!isNum(j)) return "–";
    var u = energyUnit(j);
    var text = sig(j * u[0], 3);
    if (isNum(ci)) text += " ± " + sig(ci * u[0], 2);
    return text + " " + u[1];
  }

  function fmtRatio(v) { return isNum(v) ? v.toFixed(v >= 10 ? 1 : 2) : "–"; }
  function fmtPct(v, digits) { return isNum(v) ? (v * 100).toFixed(digits === undefined ? 0 : digits) + " %" : "–"; }
  function fmtAcc(v) { return isNum(v) ? v.toFixed(2) + " %" : "–"; }
  function fmtRate(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") + " img/s" : "–"; }
  function fmtWatts(v) { return isNum(v) ? Math.round(v) + " W" : "–"; }
  function fmtParams(v) { return isNum(v) ? sig(v, 3) + " M" : "–"; }

  function configText(r) {
    var parts = [r.precision, "batch " + r.batch_size];
    if (r.channels_last) parts.push("channels_last");
    if (r.compile) parts.push("compile");
    if (r.cuda_graphs) parts.push("CUDA graphs");
    parts.push(r.img_size + " px");
    return parts.join(", ");
  }

  // Band colours come with the data (wattscope.analysis.score.BAND_COLOURS, as the figures use them).
  function bandColor(band, missing) {
    var colours = state.data.score.band_colours || {};
    return colours[band] || missing;
  }

  // Dark text on a light background: relative luminance (sRGB weights) of a #rrggbb colour above one half.
  function isLight(hex) {
    var m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex);
    if (!m) return false;
    return (0.2126 * parseInt(m[1], 16) + 0.7152 * parseInt(m[2], 16) + 0.0722 * parseInt(m[3], 16)) / 255 > 0.5;
  }

  function bandBadge(band) {
    if (!band) return el("span", { class: "missing", text: "no score" });
    var colour = bandColor(band, "#888");
    return el("span", { class: "band" + (isLight(colour) ? " light" : ""), style: "background:" + colour, text: band });
  }

  function scoreNodes(r) {
    if (!isNum(r.ratio)) return [el("span", { class: "missing", text: "no score" })];
    var out = [bandBadge(r.band), " " + fmtRatio(r.ratio) + "× the frontier"];
    if (isNum(r.ratio_low) && isNum(r.ratio_high)) out.push(" (" + fmtRatio(r.ratio_low) + "–" + fmtRatio(r.ratio_high) + ")");
    if (r.straddles) out.push(el("div", { class: "note", text: "CI straddles a band edge: " + r.band_low + " to " +
      r.band_high }));
    return out;
  }

  // --- filtering (mirrored by payload.RowFilter) ------------------------------------------------------------------

  function defaultFilter() {
    return { families: new Set(), paramsMin: null, paramsMax: null, precisions: null, batchSizes: null, gpus: null,
      query: "" };
  }

  function haystack(r) {
    return [r.architecture, r.unit_key, r.family, r.precision, r.gpu_name].join(" ").toLowerCase();
  }

  function matches(r, f) {
    if (f.families.size && !f.families.has(r.family)) return false;
    if (f.paramsMin !== null && !(isNum(r.params_m) && r.params_m >= f.paramsMin)) return false;
    if (f.paramsMax !== null && !(isNum(r.params_m) && r.params_m <= f.paramsMax)) return false;
    if (f.precisions !== null && !f.precisions.has(String(r.precision))) return false;
    if (f.batchSizes !== null && !f.batchSizes.has(String(r.batch_size))) return false;
    if (f.gpus !== null && !f.gpus.has(String(r.gpu_name))) return false;
    var terms = f.query.toLowerCase().split(/\s+/).filter(Boolean);
    if (terms.length) {
      var hay = haystack(r);
      for (var i = 0; i < terms.length; i++) if (hay.indexOf(terms[i]) < 0) return false;
    }
    return true;
  }

  function filterQuery(f) {
    var p = new URLSearchParams();
    Array.from(f.families).sort().forEach(function (v) { p.append("family", v); });
    if (f.paramsMin !== null) p.set("params_min", String(f.paramsMin));
    if (f.paramsMax !== null) p.set("params_max", String(f.paramsMax));
    [["precision", f.precisions], ["batch", f.batchSizes], ["gpu", f.gpus]].forEach(function (kv) {
      if (kv[1] === null) return;
      if (kv[1].size === 0) p.append(kv[0], "");  // nothing allowed: a value no row has
      else Array.from(kv[1]).sort().forEach(function (v) { p.append(kv[0], v); });
    });
    if (f.query.trim()) p.set("q", f.query.trim());
    return p.toString();
  }

  // --- controls ---------------------------------------------------------------------------------------------------

  function distinct(key) {
    var seen = new Set();
    state.rows.forEach(function (r) { if (r[key] !== null && r[key] !== undefined) seen.add(r[key]); });
    return Array.from(seen).sort(function (a, b) {
      return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
    });
  }

  function buildControls() {
    var families = distinct("family");
    var select = $("family");
    select.textContent = "";
    families.forEach(function (fam) { select.appendChild(el("option", { value: fam, text: fam })); });
    select.addEventListener("change", function () {
      state.filter.families = new Set(Array.from(select.selectedOptions).map(function (o) { return o.value; }));
      update();
    });
    $("family-clear").addEventListener("click", function () {
      Array.from(select.options).forEach(function (o) { o.selected = false; });
      state.filter.families = new Set();
      update();
    });

    checkboxGroup("precision", distinct("precision"), "precisions", "precision");
    checkboxGroup("batch", distinct("batch_size"), "batchSizes", "batch");
    checkboxGroup("gpu", distinct("gpu_name"), "gpus", "gpu");

    function numberInput(id, key) {
      $(id).addEventListener("input", function () {
        var v = $(id).value.trim();
        state.filter[key] = v === "" || !isFinite(Number(v)) ? null : Number(v);
        update();
      });
    }
    numberInput("params-min", "paramsMin");
    numberInput("params-max", "paramsMax");
    $("search").addEventListener("input", function () { state.filter.query = $("search").value; update(); });
    Array.from(document.querySelectorAll("input[name=color-by]")).forEach(function (radio) {
      radio.addEventListener("change", function () { if (radio.checked) { state.colorBy = radio.value; update(); } });
    });
    var sliceSelect = $("frontier-slice");
    sliceSelect.textContent = "";
    sliceSelect.appendChild(el("option", { value: "auto", text: "automatic: the configuration shown" }));
    state.data.slices.forEach(function (sl) { sliceSelect.appendChild(el("option", { value: sl.key, text: sl.label })); });
    sliceSelect.addEventListener("change", update);
    $("reset").addEventListener("click", resetFilters);
    $("clear-selection").addEventListener("click", function () { state.selected = []; update(); });
    $("download").addEventListener("click", download);
    window.addEventListener("resize", function () { renderChart(); });
  }

  function checkboxGroup(id, values, key, name) {
    var box = $(id);
    Array.from(box.querySelectorAll("label")).forEach(function (n) { n.remove(); });
    values.forEach(function (v) {
      var input = el("input", { type: "checkbox", name: name, value: String(v), checked: true });
      input.addEventListener("change", function () {
        var checked = Array.from(box.querySelectorAll("input:checked")).map(function (i) { return i.value; });
        state.filter[key] = checked.length === values.length ? null : new Set(checked);
        update();
      });
      box.appendChild(el("label", null, [input, String(v)]));
    });
    box.hidden = values.length === 0;
  }

  function resetFilters() {
    state.filter = defaultFilter();
    $("search").value = "";
    $("params-min").value = "";
    $("params-max").value = "";
    Array.from($("family").options).forEach(function (o) { o.selected = false; });
    Array.from(document.querySelectorAll(".filters input[type=checkbox]")).forEach(function (i) { i.checked = true; });
    $("frontier-slice").value = "auto";
    update();
  }

  // --- chart ------------------------------------------------------------------------------------------------------

  // The frontier and fit drawn: the chosen configuration slice, or (automatic) the first slice, in the payload's
  // order (the reference first), that has points shown, so that filtering to one configuration shows its own.
  function shownSlice() {
    var choice = $("frontier-slice").value;
    if (choice !== "auto" && state.sliceByKey.has(choice)) return state.sliceByKey.get(choice);
    var keys = new Set(state.visible.filter(function (r) { return r.plotted; }).map(function (r) { return r.slice; }));
    return state.data.slices.find(function (sl) { return keys.has(sl.key); }) || state.data.slices[0] || null;
  }

  function colorOf(r) {
    if (state.colorBy === "band") return bandColor(r.band, "#9aa3ad");
    return state.familyColor.get(r.family) || "#9aa3ad";
  }

  function extent(values) {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) { if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    return lo <= hi ? [lo, hi] : null;
  }

  // The coarsest of 1, 1-3, 1-2-5 and 1..9 per decade that gives three ticks; a span too short for two of those
  // (a few points of similar energy) gets evenly spaced ones.
  function logTicks(lo, hi) {
    var sets = [[1], [1, 3], [1, 2, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]];
    var decades = Math.log10(hi / lo);
    var ticks = [];
    for (var s = decades > 3 ? 0 : decades > 1.2 ? 1 : 2; s < sets.length; s++) {
      ticks = [];
      for (var k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
        sets[s].forEach(function (m) {
          var v = m * Math.pow(10, k);
          if (v >= lo * 0.999 && v <= hi * 1.001) ticks.push(v);
        });
      }
      if (ticks.length >= 3) return ticks;
    }
    return ticks.length >= 2 ? ticks : linTicks(lo, hi, 4);
  }

  function linTicks(lo, hi, count) {
    var raw = (hi - lo) / count;
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (m) { return m * mag; }).find(function (s) { return s >= raw; });
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(+v.toFixed(10));
    return ticks;
  }

  function tickEnergy(j) {
    var u = energyUnit(j);
    return +(j * u[0]).toPrecision(3) + " " + u[1];
  }

  function renderChart() {
    var svg = $("chart");
    var width = Math.max(360, svg.clientWidth || svg.parentNode.clientWidth || 800);
    var height = svg.clientHeight || 480;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.textContent = "";
    var m = { l: 58, r: 18, t: 14, b: 46 };
    var w = width - m.l - m.r, h = height - m.t - m.b;
    var plotted = state.rows.filter(function (r) { return r.plotted; });
    // Axes span all rows, not only the filtered ones, so that points keep their place while filters change.
    var ex = extent(plotted.map(function (r) { return Math.log10(r.energy_per_image_j); }));
    var ey = extent(plotted.map(function (r) { return r.top1; }));
    if (!ex || !ey) {
      svg.appendChild(svgEl("text", { x: width / 2, y: height / 2, "text-anchor": "middle",
        text: "nothing to plot: no result has both a top-1 accuracy (timm's catalog) and an energy" }));
      return;
    }
    var padX = Math.max(0.08, (ex[1] - ex[0]) * 0.06), padY = Math.max(0.8, (ey[1] - ey[0]) * 0.06);
    var x0 = ex[0] - padX, x1 = ex[1] + padX, y0 = ey[0] - padY, y1 = ey[1] + padY;
    function sx(j) { return m.l + (Math.log10(j) - x0) / (x1 - x0) * w; }
    function sy(a) { return m.t + (1 - (a - y0) / (y1 - y0)) * h; }

    var defs = svgEl("defs", null, svgEl("clipPath", { id: "plot-clip" },
      svgEl("rect", { x: m.l, y: m.t, width: w, height: h })));
    svg.appendChild(defs);

    var grid = svgEl("g", { class: "grid" });
    var axes = svgEl("g", { class: "axis" });
    logTicks(Math.pow(10, x0), Math.pow(10, x1)).forEach(function (v) {
      var x = sx(v);
      grid.appendChild(svgEl("line", { x1: x, x2: x, y1: m.t, y2: m.t + h }));
      axes.appendChild(svgEl("line", { x1: x, x2: x, y1: m.t + h, y2: m.t + h + 4 }));
      axes.appendChild(svgEl("text", { class: "x-tick", x: x, y: m.t + h + 16, "text-anchor": "middle",
        text: tickEnergy(v) }));
    });
    linTicks(y0, y1, 6).forEach(function (v) {
      var y = sy(v);
      grid.appendChild(svgEl("line", { x1: m.l, x2: m.l + w, y1: y, y2: y }));
      axes.appendChild(svgEl("line", { x1: m.l - 4, x2: m.l, y1: y, y2: y }));
      axes.appendChild(svgEl("text", { x: m.l - 7, y: y + 4, "text-anchor": "end", text: String(v) }));
    });
    axes.appendChild(svgEl("path", { d: "M" + m.l + "," + m.t + "V" + (m.t + h) + "H" + (m.l + w), fill: "none" }));
    axes.appendChild(svgEl("text", { class: "axis-label", x: m.l + w / 2, y: height - 8, "text-anchor": "middle",
      text: "energy per image (log scale)" }));
    axes.appendChild(svgEl("text", { class: "axis-label", transform: "rotate(-90)", x: -(m.t + h / 2), y: 15,
      "text-anchor": "middle", text: "ImageNet top-1 accuracy (%)" }));
    svg.appendChild(grid);
    svg.appendChild(axes);

    var clipped = svgEl("g", { "clip-path": "url(#plot-clip)" });
    svg.appendChild(clipped);
    var slice = shownSlice();
    var fit = slice ? slice.fit : null;
    if (fit && fit.curve && fit.curve.top1.length > 1) {
      var d = "";
      fit.curve.top1.forEach(function (a, i) {
        var e = fit.curve.energy_per_image_j[i];
        if (!isNum(a) || !isNum(e) || e <= 0) return;
        d += (d ? "L" : "M") + sx(e).toFixed(1) + "," + sy(a).toFixed(1);
      });
      if (d) clipped.appendChild(svgEl("path", { class: "fit-line", d: d }));
    }
    var frontIds = new Set(slice ? slice.frontier : []);
    var front = (slice ? slice.frontier : []).map(function (id) { return state.byId.get(id); }).filter(function (r) {
      return r && r.plotted;
    });
    if (front.length > 1) {
      // The attainable region's edge: at any energy between two frontier points the best accuracy is the lower one's.
      var steps = "M" + sx(front[0].energy_per_image_j).toFixed(1) + "," + sy(front[0].top1).toFixed(1);
      for (var i = 1; i < front.length; i++) {
        steps += "H" + sx(front[i].energy_per_image_j).toFixed(1) + "V" + sy(front[i].top1).toFixed(1);
      }
      clipped.appendChild(svgEl("path", { class: "frontier-line", d: steps }));
    }

    var selected = new Set(state.selected);
    var cis = svgEl("g");
    var points = svgEl("g", { id: "points" });
    // Selected points last, so that they are drawn on top.
    var order = state.visible.filter(function (r) { return r.plotted; }).sort(function (a, b) {
      return (selected.has(a.id) ? 1 : 0) - (selected.has(b.id) ? 1 : 0);
    });
    order.forEach(function (r) {
      var cx = sx(r.energy_per_image_j), cy = sy(r.top1);
      var color = colorOf(r);
      if (isNum(r.energy_per_image_ci95_j) && r.energy_per_image_ci95_j > 0) {
        var lo = Math.max(r.energy_per_image_j - r.energy_per_image_ci95_j, Math.pow(10, x0));
        var hi = r.energy_per_image_j + r.energy_per_image_ci95_j;
        if (sx(hi) - sx(lo) > 3) cis.appendChild(svgEl("line", { class: "ci", x1: sx(lo), x2: sx(hi), y1: cy, y2: cy,
          stroke: color }));
      }
      var cls = "point" + (frontIds.has(r.id) ? " frontier" : "") + (slice && r.slice !== slice.key ? " other" : "") + (selected.has(r.id) ? " selected" : "") +
        (state.colorBy === "band" && r.straddles ? " straddles" : "");
      points.appendChild(svgEl("circle", { class: cls, "data-id": r.id, cx: cx.toFixed(1), cy: cy.toFixed(1),
        r: selected.has(r.id) ? 7 : 5, fill: color }));
    });
    clipped.appendChild(cis);
    svg.appendChild(points);
  }

  function renderLegend() {
    var box = $("legend");
    box.textContent = "";
    var items = [];
    if (state.colorBy === "band") {
      var edges = state.data.score.band_edges;
      state.data.score.bands.forEach(function (b, i) {
        var range = i < edges.length ? " ≤ " + edges[i] + "×" : " > " + edges[edges.length - 1] + "×";
        items.push([bandColor(b, "#9aa3ad"), b + range]);
      });
    } else {
      var shown = new Set(state.visible.map(function (r) { return r.family; }));
      Array.from(state.familyColor.keys()).filter(function (f) { return shown.has(f); }).forEach(function (f) {
        items.push([state.familyColor.get(f), f]);
      });
    }
    items.forEach(function (it) {
      box.appendChild(el("span", { class: "item" }, [el("span", { class: "swatch", style: "background:" + it[0] }),
        it[1]]));
    });
    var slice = shownSlice();
    if (!slice || !slice.frontier.some(function (id) { return state.byId.get(id).plotted; })) return;
    box.appendChild(el("span", { class: "item" }, [el("span", { class: "swatch step" }),
      "Pareto frontier of " + slice.label]));
    if (slice.fit) {
      box.appendChild(el("span", { class: "item" }, [el("span", { class: "swatch line" }),
        "its fit: " + slice.fit.best.replace(/_/g, " ")]));
    }
    if (state.visible.some(function (r) { return r.plotted && r.slice !== slice.key; })) {
      box.appendChild(el("span", { class: "item" }, [el("span", { class: "swatch faded" }), "faded: other configurations"]));
    }
  }

  // --- hover and selection ----------------------------------------------------------------------------------------

  function detailRows(r) {
    return [
      ["family", r.family],
      ["configuration", configText(r)],
      ["GPU", r.gpu_name],
      ["parameters", fmtParams(r.params_m) + (isNum(r.gmacs) ? ", " + sig(r.gmacs, 3) + " GMACs / image" : "")],
      ["top-1", fmtAcc(r.top1)],
      ["energy / image", fmtEnergy(r.energy_per_image_j, r.energy_per_image_ci95_j)],
      ["throughput", fmtRate(r.images_per_s)],
      ["mean power", fmtWatts(r.mean_power_w)],
      ["score", scoreNodes(r)],
    ];
  }

  function showTooltip(r, evt) {
    var tip = $("tooltip");
    tip.textContent = "";
    tip.appendChild(el("b", { text: r.architecture }));
    if (r.on_frontier) tip.appendChild(el("span", { class: "note", text: "  on its configuration's frontier" }));
    tip.appendChild(el("table", null, detailRows(r).map(function (kv) {
      return el("tr", null, [el("td", { text: kv[0] }), el("td", null, kv[1])]);
    })));
    tip.hidden = false;
    var box = $("chart-box").getBoundingClientRect();
    var x = evt.clientX - box.left + 14, y = evt.clientY - box.top + 14;
    if (x + tip.offsetWidth > box.width) x = Math.max(0, evt.clientX - box.left - tip.offsetWidth - 14);
    if (y + tip.offsetHeight > box.height) y = Math.max(0, evt.clientY - box.top - tip.offsetHeight - 14);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }

  function pointOf(evt) {
    var t = evt.target;
    return t && t.classList && t.classList.contains("point") ? state.byId.get(Number(t.getAttribute("data-id"))) : null;
  }

  function wireChart() {
    var svg = $("chart");
    svg.addEventListener("mousemove", function (evt) {
      var r = pointOf(evt);
      if (r) showTooltip(r, evt); else $("tooltip").hidden = true;
    });
    svg.addEventListener("mouseleave", function () { $("tooltip").hidden = true; });
    svg.addEventListener("click", function (evt) {
      var r = pointOf(evt);
      if (!r) return;
      var i = state.selected.indexOf(r.id);
      if (i >= 0) state.selected.splice(i, 1); else state.selected.push(r.id);
      update();
    });
  }

  // --- comparison -------------------------------------------------------------------------------------------------

  function savingsNode(r) {
    var list = state.data.savings.by_unit[r.gpu_name + "|" + r.unit_key];
    if (!list || !list.length) return el("span", { class: "missing", text: "not measured (no pair of configurations " +
      "of this model that differ in one method)" });
    // The same pair of configurations measured on several boards gives one pair per board: show them as one line.
    var groups = [], byKey = {};
    list.forEach(function (s) {
      var key = s.method + "|" + s.from_config + "|" + s.to_config;
      if (!byKey[key]) { byKey[key] = []; groups.push(byKey[key]); }
      byKey[key].push(s);
    });
    return el("ul", null, groups.map(function (g) {
      var s = g[0], text;
      if (g.length === 1) {
        var ci = isNum(s.ci95_low) && isNum(s.ci95_high) ? " [" + fmtPct(s.ci95_low) + ", " + fmtPct(s.ci95_high) + "]" : "";
        text = s.method + ": " + fmtPct(s.saving_frac) + ci;
      } else {
        // The geometric mean of the energy ratios, as the method figure and the per-family savings combine them.
        var v = g.map(function (x) { return x.saving_frac; }).sort(function (a, b) { return a - b; });
        var meanLog = v.reduce(function (sum, x) { return sum + Math.log(1 - x); }, 0) / v.length;
        text = s.method + ": " + fmtPct(1 - Math.exp(meanLog)) + " (geometric mean of " + v.length +
          " pairs of boards, " + fmtPct(v[0]) + " to " + fmtPct(v[v.length - 1]) + ")";
      }
      return el("li", { title: s.from_config + " → " + s.to_config, text: text });
    }));
  }

  function kernelsNode(r) {
    if (!r.kernels || !r.kernels.length) {
      return el("span", { class: "missing", text: r.kernels_note || "not measured" });
    }
    var top = r.kernels.slice(0, 8);
    var total = r.kernels.reduce(function (s, k) { return s + (isNum(k.energy_j) ? k.energy_j : 0); }, 0);
    var max = Math.max.apply(null, top.map(function (k) { return isNum(k.energy_j) ? k.energy_j : 0; })) || 1;
    var grid = el("div", { class: "kbar" });
    top.forEach(function (k) {
      var share = isNum(k.share) ? k.share : total > 0 ? k.energy_j / total : NaN;
      grid.appendChild(el("div", null, [el("div", { class: "name", title: k.name, text: k.name }),
        el("div", { class: "bar", style: "width:" + (100 * (isNum(k.energy_j) ? k.energy_j : 0) / max).toFixed(1) + "%" })]));
      grid.appendChild(el("div", { class: "num", text: fmtEnergy(k.energy_j) + " · " + fmtPct(share, 1) }));
    });
    var wrap = el("div", null, grid);
    if (r.kernels.length > top.length) {
      wrap.appendChild(el("div", { class: "note", text: "+ " + (r.kernels.length - top.length) + " more kernels" }));
    }
    return wrap;
  }

  function timelineNode(r) {
    var p = r.power;
    if (!p || !p.t_s || p.t_s.length < 2) return el("span", { class: "missing", text: "not measured" });
    var W = 240, H = 70, pad = 4;
    var et = extent(p.t_s), ep = extent(p.power_w);
    if (!et || !ep) return el("span", { class: "missing", text: "not measured" });
    var spanP = ep[1] - ep[0] || 1, spanT = et[1] - et[0] || 1;
    var d = "";
    p.t_s.forEach(function (t, i) {
      var x = pad + (t - et[0]) / spanT * (W - 2 * pad);
      var y = H - pad - (p.power_w[i] - ep[0]) / spanP * (H - 2 * pad);
      d += (i ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1);
    });
    var svg = svgEl("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "power timeline" }, svgEl("path", { d: d, fill: "none", stroke: "#1f5fa8", "stroke-width": 1.5 }));
    return el("div", null, [svg, el("div", { class: "note", text: fmtWatts(ep[0]) + " to " + fmtWatts(ep[1]) +
      " over " + sig(spanT, 3) + " s" })]);
  }

  function renderCompare() {
    var box = $("compare");
    box.textContent = "";
    var rows = state.selected.map(function (id) { return state.byId.get(id); });
    $("clear-selection").disabled = rows.length === 0;
    if (rows.length === 0) return;
    box.appendChild(el("h2", { text: rows.length >= 2 ? "Comparison" : "Selected" }));
    if (rows.length < 2) box.appendChild(el("p", { class: "hint", text: "Select another point to compare side by side." }));
    var head = el("tr", null, [el("th", { scope: "col", text: "" })].concat(rows.map(function (r) {
      var remove = el("button", { type: "button", class: "remove", title: "remove from the comparison", text: "×" });
      remove.addEventListener("click", function () {
        state.selected = state.selected.filter(function (id) { return id !== r.id; });
        update();
      });
      return el("th", { scope: "col", class: "model-name" }, [remove, r.architecture]);
    })));
    var lines = [
      ["family", function (r) { return r.family; }],
      ["configuration", configText],
      ["GPU", function (r) { return r.gpu_name; }],
      ["parameters", function (r) { return fmtParams(r.params_m); }],
      ["top-1 accuracy", function (r) { return fmtAcc(r.top1); }],
      ["energy per image (± 95 % CI)", function (r) { return fmtEnergy(r.energy_per_image_j, r.energy_per_image_ci95_j); }],
      ["throughput", function (r) { return fmtRate(r.images_per_s); }],
      ["mean power (idle)", function (r) { return fmtWatts(r.mean_power_w) + " (" + fmtWatts(r.idle_power_w) + ")"; }],
      ["score (energy / frontier energy at equal accuracy)", scoreNodes],
      ["saving by method (vs this model without it)", savingsNode],
      ["per-kernel energy", kernelsNode],
      ["power timeline", timelineNode],
    ];
    var body = el("tbody", null, lines.map(function (line) {
      return el("tr", null, [el("th", { scope: "row", text: line[0] })].concat(rows.map(function (r) {
        return el("td", null, line[1](r));
      })));
    }));
    box.appendChild(el("table", null, [el("thead", null, head), body]));
  }

  // --- static sections --------------------------------------------------------------------------------------------

  function table(columns, rows, bestCol) {
    return el("table", { class: "data-table" }, [
      el("thead", null, el("tr", null, columns.map(function (c) { return el("th", { text: c }); }))),
      el("tbody", null, rows.map(function (cells) {
        return el("tr", null, cells.map(function (c, i) {
          var marked = c !== null && typeof c === "object" && c.best && (bestCol === undefined || i === bestCol);
          return el("td", { class: marked ? "best" : null, text: c !== null && typeof c === "object" ? c.text : c });
        }));
      })),
    ]);
  }

  function renderStatic() {
    var d = state.data;
    var src = d.source || {};
    $("source").textContent = [src.db, src.gpus && src.gpus.length ? src.gpus.join(", ") : null,
      d.rows.length + (d.rows.length === 1 ? " result" : " results"), "score v" + d.score.version,
      d.excluded && d.excluded.note].filter(Boolean).join(" · ");
    $("formula").textContent = d.score.formula;
    var fam = d.savings.by_family;
    $("savings-note").textContent = d.savings.note || "";
    $("savings-table").textContent = "";
    if (fam && fam.families.length) {
      // One block of rows per GPU model (a method saves different fractions on different GPUs); the GPU column
      // only when there are several.
      var gpus = new Set(fam.families.map(function (f) { return f.gpu_name; }));
      var gpuCol = gpus.size > 1;
      $("savings-table").appendChild(table((gpuCol ? ["GPU"] : []).concat(["family"], fam.methods),
        fam.families.map(function (f) {
          var head = [f.family === "all" ? { text: "all families", best: true } : f.family];
          if (gpuCol) head.unshift(f.gpu_name);
          return head.concat(fam.methods.map(function (m) {
            var s = f.values[m];
            return s ? { text: fmtPct(s.saving_frac) + " (" + s.n_models + ")", best: s.helps || s.hurts } : "";
          }));
        })));
    } else {
      $("savings-table").appendChild(el("p", { class: "missing", text: "No model has both a baseline and another configuration measured." }));
    }
  }

  function renderFit() {
    var slice = shownSlice();
    var box = $("fit-table");
    box.textContent = "";
    $("fit-slice").textContent = slice ? slice.label + " (" + slice.n_models + " models with an accuracy, " +
      slice.frontier.length + " on the frontier)" : "";
    var fit = slice ? slice.fit : null;
    $("verdict").textContent = fit ? fit.verdict : slice ? slice.fit_note : "no results";
    if (!fit || !fit.forms) return;
    box.appendChild(table(["form", "parameters", "AICc", "BIC", "ΔAICc", "R² (ln E)", "RMSE (ln E)", "n"],
      fit.forms.map(function (f) {
        var params = Object.keys(f.params || {}).map(function (k) { return k + " = " + sig(f.params[k], 3); }).join(", ");
        return [{ text: f.form.replace(/_/g, " "), best: f.form === fit.best }, params, sig(f.aicc, 4), sig(f.bic, 4),
          sig(f.delta_aicc, 3), sig(f.r2, 3), sig(f.rmse_log, 3), String(f.n)];
      }), 0));
  }

  // --- data flow --------------------------------------------------------------------------------------------------

  function update() {
    state.visible = state.rows.filter(function (r) { return matches(r, state.filter); });
    var shown = state.visible.filter(function (r) { return r.plotted; }).length;
    var total = state.rows.filter(function (r) { return r.plotted; }).length;
    var unplotted = state.visible.length - shown;
    $("count").textContent = shown + " of " + total + (total === 1 ? " point" : " points") + " shown" +
      (unplotted ? " (" + unplotted + " filtered rows lack accuracy or energy)" : "");
    $("count").setAttribute("data-count", String(shown));
    renderChart();
    renderLegend();
    renderFit();
    renderCompare();
  }

  function csvCell(v) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "";
    if (typeof v === "boolean") return v ? "1" : "0";
    var s = String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function download() {
    if (state.served) {
      // Through fetch, not navigation: a server that cannot read the database any more answers with an error text,
      // which the banner shows while the page stays.
      fetch("api/table.csv?" + filterQuery(state.filter), { cache: "no-store" }).then(function (r) {
        return r.text().then(function (text) {
          if (!r.ok) throw new Error(text.trim() || "the server answered " + r.status);
          saveCsv(text);
        });
      }).catch(function (e) {
        showBanner("The table could not be downloaded: " + e.message);
      });
      return;
    }
    var cols = state.data.columns;
    var lines = [cols.join(",")].concat(state.visible.map(function (r) {
      return cols.map(function (c) { return csvCell(r[c]); }).join(",");
    }));
    saveCsv(lines.join("\r\n") + "\r\n");
  }

  function saveCsv(text) {
    var url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    var a = el("a", { href: url, download: "wattscope-table.csv" });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  }

  function showError(message) {
    $("app").hidden = true;
    $("error-message").textContent = message;
    $("error").hidden = false;
    document.body.setAttribute("data-state", "error");
  }

  function start(data) {
    state.data = data;
    state.rows = data.rows;
    state.byId = new Map(data.rows.map(function (r) { return [r.id, r]; }));
    state.sliceByKey = new Map(data.slices.map(function (sl) { return [sl.key, sl]; }));
    distinct("family").forEach(function (f, i) { state.familyColor.set(f, PALETTE[i % PALETTE.length]); });
    state.filter = defaultFilter();
    state.version = data.server ? data.server.version : null;
    $("app").hidden = false;
    buildControls();
    wireChart();
    renderStatic();
    update();
    document.body.setAttribute("data-state", "ready");
    if (state.served) setInterval(poll, POLL_MS);
  }

  function showBanner(message) {
    $("stale").textContent = message;
    $("stale").hidden = false;
  }

  function poll() {
    fetch("api/status", { cache: "no-store" }).then(function (r) { return r.json(); }).then(function (s) {
      if (!s.ok) showBanner("The database can no longer be read: " + s.error + " The view below is from the last good read.");
      else if (s.version !== state.version) showBanner("The database has changed since this page was loaded: reload the page to see the new results.");
      else $("stale").hidden = true;
    }).catch(function () {
      showBanner("The wattscope server no longer answers; the view below is from the last good read.");
    });
  }

  function boot() {
    var inline = document.getElementById("wattscope-data");
    if (inline) {
      start(JSON.parse(inline.textContent));
      return;
    }
    state.served = true;
    fetch("api/data", { cache: "no-store" }).then(function (r) {
      return r.json().then(function (body) {
        if (r.ok) start(body);
        else showError(body.error || ("the server answered " + r.status));
      });
    }).catch(function (e) {
      showError("Cannot load the results from the wattscope server: " + e.message);
    });
  }

  // For tests and scripting: the filter query the download would use, and the rows currently shown.
  window.wattscope = {
    poll: poll,
    filterQuery: function () { return filterQuery(state.filter); },
    visibleIds: function () { return state.visible.filter(function (r) { return r.plotted; }).map(function (r) { return r.id; }); },
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
