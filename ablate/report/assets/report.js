/* ablate report: the page logic of `ablate report` (shipped with ablate; no library, no network).
 *
 * Data: window.ABLATE_DATA (data/table.js) holds the table, facets, the Pareto points and the
 * study; each row's details (curves, configuration, runs, images) come from data/rows/<i>.js,
 * loaded on demand. Views by the URL's hash: #table (default), #row/<i>, #compare/<i>,<j>,...,
 * #pareto, #study. Text from the database (captions, errors, descriptions, names) is only ever
 * inserted as text (textContent, attribute values), never as markup.
 */
(function () {
  "use strict";
  var D = window.ABLATE_DATA;
  var SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, not a network address
  var app = document.getElementById("app");
  var state = {sort: null, dir: 1, text: "", facets: {}, page: 0, size: 50, selected: [], cmpStep: "final"};
  var details = {}, waiting = {};

  // ------------------------------------------------------------------ small DOM helpers
  function el(tag, props) {
    var e = document.createElement(tag);
    setProps(e, props);
    for (var i = 2; i < arguments.length; i++) add(e, arguments[i]);
    return e;
  }
  function setProps(e, props) {
    if (!props) return;
    Object.keys(props).forEach(function (k) {
      var v = props[k];
      if (v === null || v === undefined) return;
      if (k === "class") e.setAttribute("class", v);
      else if (k === "text") e.textContent = v;
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    });
  }
  function add(parent) { // add(parent, child, ...): children may be nodes, text, arrays, null
    for (var i = 1; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) add.apply(null, [parent].concat(child));
      else parent.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) add(e, arguments[i]);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function fmt(v) {
    if (v === null || v === undefined) return "-";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(Math.round(v * 1e4) / 1e4);
  }
  function rowLabel(i) {
    var r = D.rows[i];
    var hyper = r.cells[colIndex("Hyperparameters")];
    return r.cells[0] + (hyper && hyper !== "base" && hyper !== "-" ? " (" + hyper + ")" : "");
  }
  function colIndex(title) {
    for (var j = 0; j < D.columns.length; j++) if (D.columns[j].title === title) return j;
    return -1;
  }
  function hole(text) { return el("div", {"class": "hole", title: text}, el("span", {text: text})); }

  // ------------------------------------------------------------------ per-row details, lazily
  // prompts and captions are shared by many runs: data/texts.js holds each list once, and a
  // row's sheets and samples name theirs by index (resolved here, when the row arrives)
  var texts = null, textsWaiting = [];
  window.ablateTexts = function (t) {
    texts = t;
    textsWaiting.forEach(function (cb) { cb(); });
    textsWaiting = [];
  };
  function withTexts(cb) {
    if (texts) { cb(); return; }
    textsWaiting.push(cb);
    if (textsWaiting.length === 1) {
      var s = el("script", {src: "data/texts.js"});
      s.onerror = function () { texts = []; cb(); };
      document.head.appendChild(s);
    }
  }
  window.ablateRow = function (i, data) {
    data.sheets.forEach(function (s) { s.prompts = texts[s.prompts] || []; });
    data.samples.forEach(function (s) { s.captions = texts[s.captions] || []; });
    details[i] = data;
    (waiting[i] || []).forEach(function (cb) { cb(data); });
    delete waiting[i];
  };
  function loadRow(i, cb) {
    if (details[i]) { cb(details[i]); return; }
    if (waiting[i]) { waiting[i].push(cb); return; }
    waiting[i] = [cb];
    withTexts(function () {
      var s = el("script", {src: "data/rows/" + Number(i) + ".js"});
      s.onerror = function () { (waiting[i] || []).forEach(function (f) { f(null); }); delete waiting[i]; };
      document.head.appendChild(s);
    });
  }
  function loadRows(ids, cb) {
    var out = {}, left = ids.length;
    if (!left) { cb(out); return; }
    ids.forEach(function (i) { loadRow(i, function (d) { out[i] = d; if (--left === 0) cb(out); }); });
  }

  // ------------------------------------------------------------------ table: filter, sort, page
  var haystack = D.rows.map(function (r) {
    return (r.cells.join(" \u0001 ") + " " + Object.keys(r.facets).map(function (k) {
      return k + "=" + r.facets[k];
    }).join(" ")).toLowerCase();
  });
  function visibleRows() {
    var text = state.text.toLowerCase(), keys = Object.keys(state.facets);
    var out = [];
    for (var i = 0; i < D.rows.length; i++) {
      var r = D.rows[i], ok = !text || haystack[i].indexOf(text) >= 0;
      for (var k = 0; ok && k < keys.length; k++) ok = r.facets[keys[k]] === state.facets[keys[k]];
      if (ok) out.push(i);
    }
    if (state.sort !== null) {
      var j = state.sort, dir = state.dir, kind = D.columns[j].kind;
      out.sort(function (a, b) {
        var x = D.rows[a], y = D.rows[b], c;
        if (kind !== "text") {
          var u = x.sort[j], v = y.sort[j];
          if (u === null && v === null) c = 0;
          else if (u === null) return 1;      // rows without a value last, either direction
          else if (v === null) return -1;
          else c = u - v;
        } else {
          c = x.cells[j].localeCompare(y.cells[j], undefined, {numeric: true});
        }
        return c * dir || a - b;
      });
    }
    return out;
  }
  function defaultDir(j) {
    var c = D.columns[j];
    return c.kind === "metric" && c.higher === true ? -1 : 1; // metrics: best first
  }
  function renderTable() {
    var rows = visibleRows();
    var pages = Math.max(1, Math.ceil(rows.length / state.size));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * state.size, shown = rows.slice(start, start + state.size);

    var filter = el("input", {id: "filter", type: "search", placeholder: "filter rows: any text, e.g. mamba or model.width=96",
                              value: state.text, "aria-label": "filter rows"});
    filter.addEventListener("input", function () { state.text = filter.value; state.page = 0; rerenderKeepFocus("filter"); });
    var facets = D.facets.map(function (f) {
      var sel = el("select", {"class": "facet", "data-key": f.key, "aria-label": "filter by " + f.key},
                   el("option", {value: "", text: f.key + ": all"}),
                   f.values.map(function (v) { return el("option", {value: v, text: f.key + " = " + v}); }));
      sel.value = state.facets[f.key] || "";
      sel.addEventListener("change", function () {
        if (sel.value) state.facets[f.key] = sel.value; else delete state.facets[f.key];
        state.page = 0; render();
      });
      return sel;
    });
    var compare = el("button", {id: "compare-button", type: "button", text: "Compare selected (" + state.selected.length + ")",
                                onclick: function () { location.hash = "#compare/" + state.selected.join(","); }});
    compare.disabled = state.selected.length === 0;
    var clearAll = el("button", {type: "button", text: "Clear filters", onclick: function () {
      state.text = ""; state.facets = {}; state.page = 0; render(); }});
    var controls = el("div", {"class": "controls"}, filter, facets.length > 3 ? null : facets, clearAll, compare);
    if (facets.length > 3) {  // many hyperparameters: their drop-downs fold away
      var more = el("details", {"class": "facets"}, el("summary", {text: "filter by hyperparameter (" + facets.length +
        " keys" + (Object.keys(state.facets).length ? ", " + Object.keys(state.facets).length + " set" : "") + ")"}), facets);
      more.open = Object.keys(state.facets).length > 0;
      controls = [controls, more];
    }

    var head = el("tr", null, el("th", {"class": "pick", text: "pick"}), D.columns.map(function (c, j) {
      var arrow = state.sort === j ? (state.dir > 0 ? " \u25b2" : " \u25bc") : "";
      var th = el("th", {"class": "sortable " + c.kind, "data-col": j, tabindex: "0", title: "sort by " + c.title,
                         "aria-sort": state.sort === j ? (state.dir > 0 ? "ascending" : "descending") : "none"},
                  c.title + arrow);
      function go() {
        if (state.sort === j) state.dir = -state.dir; else { state.sort = j; state.dir = defaultDir(j); }
        render();
      }
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") go(); });
      return th;
    }));
    var body = el("tbody", null, shown.map(function (i) {
      var r = D.rows[i];
      var box = el("input", {type: "checkbox", "class": "pick-box", "aria-label": "pick row for comparison"});
      box.checked = state.selected.indexOf(i) >= 0;
      box.addEventListener("change", function () {
        var at = state.selected.indexOf(i);
        if (box.checked && at < 0) state.selected.push(i);
        if (!box.checked && at >= 0) state.selected.splice(at, 1);
        compare.textContent = "Compare selected (" + state.selected.length + ")";
        compare.disabled = state.selected.length === 0;
      });
      var isBase = D.meta.baseline && D.meta.baseline.row === i;
      return el("tr", {"data-row": i, "class": isBase ? "baseline" : null}, el("td", {"class": "pick"}, box),
                r.cells.map(function (text, j) {
                  var mark = r.marks[String(j)], inner = text;
                  if (j === 0) inner = el("a", {href: "#row/" + i, text: text});
                  else if (mark === "b") inner = el("strong", null, text);
                  else if (mark === "t") inner = el("em", null, text);
                  return el("td", {"class": D.columns[j].kind}, inner);
                }));
    }));
    var pager = el("div", {"class": "pager"},
                   el("button", {type: "button", id: "prev-page", text: "\u2190 previous",
                                 onclick: function () { state.page--; render(); }}),
                   el("span", {id: "page-info", text: rows.length ? "rows " + (start + 1) + "\u2013" + (start + shown.length) +
                     " of " + rows.length + (rows.length < D.rows.length ? " (filtered from " + D.rows.length + ")" : "") +
                     ", page " + (state.page + 1) + " of " + pages : "no row matches"}),
                   el("button", {type: "button", id: "next-page", text: "next \u2192",
                                 onclick: function () { state.page++; render(); }}));
    pager.firstChild.disabled = state.page === 0;
    pager.lastChild.disabled = state.page >= pages - 1;
    var table = el("table", {id: "results", "class": "results"}, el("thead", null, head), body);
    return [controls, el("div", {"class": "scroll"}, table), pager, legend()];
  }
  function legend() {
    var notes = ["Cells: mean \u00b1 half-width of the 95% Student-t interval over seeds (n runs), as `ablate table` shows them.",
                 "Bold: best, significantly (95% Welch) better than every other row; italic: tied with the best.",
                 "Click a column title to sort (again to reverse); click a Method to open its page; tick rows and Compare to see their samples side by side."];
    if (D.meta.baseline) notes.push("\u0394: difference to the baseline " + D.meta.baseline.label + " [95% Welch interval]; *: excludes 0.");
    return el("ul", {"class": "notes"}, notes.map(function (n) { return el("li", {text: n}); }));
  }
  function rerenderKeepFocus(id) {
    var pos = document.getElementById(id).selectionStart;
    render();
    var again = document.getElementById(id);
    again.focus();
    try { again.setSelectionRange(pos, pos); } catch (e) { /* search inputs may refuse */ }
  }

  // ------------------------------------------------------------------ charts (SVG)
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n))), err = (hi - lo) / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.round(t / step) * step);
    return out;
  }
  function integerTicks(d) {
    return niceTicks(d[0], d[1], 6).filter(function (t) { return Math.round(t) === t; });
  }
  function extent(values, pad) {
    var v = values.filter(function (x) { return x !== null && isFinite(x); });
    if (!v.length) return [0, 1];
    var lo = Math.min.apply(null, v), hi = Math.max.apply(null, v), p = (hi - lo || Math.abs(hi) || 1) * (pad === undefined ? 0.05 : pad);
    return [lo - p, hi + p];
  }
  // A chart frame: axes, grid, labels; draw(g, x, y) adds the marks with the scales x(v), y(v).
  function chart(o, draw) {
    var W = o.width || 560, H = o.height || 320, m = {l: 64, r: 16, t: 28, b: 46};
    var xs = o.x, ys = o.y;
    function lin(d, r0, r1, log) {
      var f = log ? Math.log10 : function (v) { return v; }, a = f(d[0]), b = f(d[1]);
      return function (v) { return r0 + (f(v) - a) / (b - a || 1) * (r1 - r0); };
    }
    var x = lin(xs.domain, m.l, W - m.r, xs.log), y = lin(ys.domain, H - m.b, m.t, ys.log);
    var root = svg("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, "class": "chart", role: "img"});
    if (o.title) add(root, svg("text", {x: m.l, y: 16, "class": "chart-title", text: o.title}));
    var gx = svg("g", {"class": "axis"}), gy = svg("g", {"class": "axis"});
    (xs.ticks || niceTicks(xs.domain[0], xs.domain[1], 6)).forEach(function (t) {
      var px = x(t);
      if (px < m.l - 1 || px > W - m.r + 1) return;
      add(gx, svg("line", {x1: px, x2: px, y1: m.t, y2: H - m.b, "class": "grid"}));
      add(gx, svg("text", {x: px, y: H - m.b + 16, "text-anchor": "middle", text: xs.tickText ? xs.tickText(t) : fmt(t)}));
    });
    (ys.ticks || niceTicks(ys.domain[0], ys.domain[1], 5)).forEach(function (t) {
      var py = y(t);
      if (py < m.t - 1 || py > H - m.b + 1) return;
      add(gy, svg("line", {x1: m.l, x2: W - m.r, y1: py, y2: py, "class": "grid"}));
      add(gy, svg("text", {x: m.l - 6, y: py + 4, "text-anchor": "end", text: fmt(t)}));
    });
    add(root, gx, gy, svg("rect", {x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, "class": "frame"}));
    add(root, svg("text", {x: (m.l + W - m.r) / 2, y: H - 8, "text-anchor": "middle", "class": "label", text: xs.label || ""}));
    add(root, svg("text", {x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle", "class": "label",
                           transform: "rotate(-90 14 " + (m.t + H - m.b) / 2 + ")", text: ys.label || ""}));
    var g = svg("g", {"class": "marks"});
    add(root, g);
    draw(g, x, y);
    return root;
  }
  function colour(i) { return "c" + (i % 10); }
  function path(xs, ys) {
    var d = "";
    for (var i = 0; i < xs.length; i++) if (ys[i] !== null) d += (d ? "L" : "M") + xs[i].toFixed(1) + "," + ys[i].toFixed(1);
    return d;
  }
  function curvePlot(name, c) {
    var lo = c.mean.map(function (v, i) { return c.std[i] === null ? v : v - c.std[i]; });
    var hi = c.mean.map(function (v, i) { return c.std[i] === null ? v : v + c.std[i]; });
    return chart({title: name.replace(/_/g, " ") + " (mean over seeds, band \u00b1 std)", width: 460, height: 280,
                  x: {domain: extent(c.step, 0.02), label: "step"}, y: {domain: extent(lo.concat(hi)), label: "loss"}},
      function (g, x, y) {
        var band = [], top = [], k;
        for (k = 0; k < c.step.length; k++) if (c.std[k] !== null) band.push(k);
        if (band.length > 1) {
          top = band.map(function (k2) { return x(c.step[k2]).toFixed(1) + "," + y(hi[k2]).toFixed(1); });
          var bottom = band.slice().reverse().map(function (k2) { return x(c.step[k2]).toFixed(1) + "," + y(lo[k2]).toFixed(1); });
          add(g, svg("polygon", {points: top.concat(bottom).join(" "), "class": "band c0"}));
        }
        add(g, svg("path", {d: path(c.step.map(x), c.mean.map(function (v) { return v === null ? null : y(v); })),
                            "class": "line c0"}));
      });
  }

  // ------------------------------------------------------------------ images: tiles of a strip
  // A tile of an image strip (sample sheet: one tile per prompt; samples.png: 8 a row): a box
  // showing the strip's (col, row) cell, scaled up with crisp pixels.
  function tile(src, col, row, cols, rows, w, h, gap, scale, title) {
    var box = el("div", {"class": "tile", title: title || null});
    box.style.width = w * scale + "px";
    box.style.height = h * scale + "px";
    box.style.backgroundImage = "url(\"" + src + "\")";
    box.style.backgroundSize = cols * (w + gap) * scale + "px " + rows * (h + gap) * scale + "px";
    box.style.backgroundPosition = -col * (w + gap) * scale + "px " + (-row * (h + gap) * scale) + "px";
    return box;
  }
  function sheetTile(sheet, step, p, scale) {
    if (!step) return hole("no snapshot");
    if (!step.src) return hole("missing: " + step.missing);
    var t = sheet.tile || [32, 32];
    return tile(step.src, p, 0, sheet.prompts.length, 1, t[1], t[0], sheet.gap, scale, sheet.prompts[p]);
  }
  function sheetTable(sheet) {
    if (sheet.missing) return hole("sample sheet missing: " + sheet.missing);
    return el("table", {"class": "sheet"},
      el("thead", null, el("tr", null, el("th", {text: "prompt"}),
        sheet.steps.map(function (s) { return el("th", {text: "step " + s.step}); }))),
      el("tbody", null, sheet.prompts.map(function (prompt, p) {
        return el("tr", null, el("th", {"class": "prompt", text: prompt}),
          sheet.steps.map(function (s) { return el("td", null, sheetTile(sheet, s, p, 2)); }));
      })));
  }
  function samplesGrid(s) {
    if (!s.src) return hole("samples missing: " + s.missing);
    var wrap = el("div", {"class": "samples"});
    if (!s.captions.length) { add(wrap, el("img", {src: s.src, alt: "final samples", loading: "lazy"})); return wrap; }
    var img = new Image();
    img.onload = function () {
      var rows = Math.ceil(s.captions.length / s.cols);
      var w = img.naturalWidth / s.cols - s.gap, h = img.naturalHeight / rows - s.gap;
      s.captions.forEach(function (cap, k) {
        add(wrap, el("figure", null, tile(s.src, k % s.cols, Math.floor(k / s.cols), s.cols, rows, w, h, s.gap, 2, cap),
                     el("figcaption", {text: cap})));
      });
    };
    img.src = s.src;
    return wrap;
  }
  function failureCards(f) {
    if (f.missing) return hole("failure cases missing: " + f.missing);
    if (!f.items.length) return el("p", {text: "none: the judge scored every image right"});
    return el("div", {"class": "failures"}, f.items.map(function (it) {
      return el("figure", {"class": "failure"},
                it.src ? el("img", {src: it.src, alt: "generated image", loading: "lazy"}) : hole("missing: " + it.missing),
                el("figcaption", null, el("div", {"class": "caption", text: "caption: " + it.caption}),
                   el("div", {"class": "read", text: "judge read: " + it.read})));
    }));
  }
  function seedPicker(list, render1) {
    var holder = el("div");
    if (!list.length) return holder;
    var sel = el("select", {"aria-label": "seed"}, list.map(function (x, k) {
      return el("option", {value: k, text: "seed " + x.seed + " (run " + x.key.slice(0, 12) + ")"});
    }));
    var body = el("div");
    function show() { clear(body); add(body, render1(list[Number(sel.value)])); }
    sel.addEventListener("change", show);
    show();
    add(holder, list.length > 1 ? sel : el("p", {"class": "meta", text: "seed " + list[0].seed + ", run " + list[0].key.slice(0, 12)}), body);
    return holder;
  }

  // ------------------------------------------------------------------ views
  function renderRow(i) {
    var r = D.rows[i];
    if (!r) return el("p", {text: "no row " + i});
    var box = el("div", {id: "row-view"}, el("p", null, el("a", {href: "#table", text: "\u2190 table"})),
                 el("h2", {text: rowLabel(i)}));
    var summary = el("table", {"class": "kv"}, D.columns.map(function (c, j) {
      var mark = r.marks[String(j)];
      return el("tr", null, el("th", {text: c.title}),
                el("td", null, mark === "b" ? el("strong", null, r.cells[j]) : mark === "t" ? el("em", null, r.cells[j]) : r.cells[j]));
    }));
    add(box, summary);
    var pick = el("button", {type: "button", text: state.selected.indexOf(i) >= 0 ? "picked for comparison" : "pick for comparison",
                             onclick: function () { if (state.selected.indexOf(i) < 0) state.selected.push(i); pick.textContent = "picked for comparison"; }});
    add(box, pick);
    var more = el("div", {"class": "loading", text: "loading\u2026"});
    add(box, more);
    loadRow(i, function (d) {
      clear(more).className = "";
      if (!d) { add(more, hole("details file data/rows/" + i + ".js is missing")); return; }
      var names = Object.keys(d.curves);
      add(more, el("h3", {text: "Loss curves"}), names.length ? el("div", {"class": "charts"}, names.map(function (n) {
        return curvePlot(n, d.curves[n]); })) : el("p", {text: "no curves recorded"}));
      add(more, el("h3", {text: "Sample sheet (prompts \u00d7 training steps)"}),
          d.sheets.length ? seedPicker(d.sheets, sheetTable) : el("p", {text: "no sample-sheet snapshots (eval.sheet_prompts)"}));
      if (d.samples.length) add(more, el("h3", {text: "Final samples"}), seedPicker(d.samples, samplesGrid));
      add(more, el("h3", {text: "Failure cases (images the judge scored wrong)"}),
          d.failures.length ? seedPicker(d.failures, failureCards) : el("p", {text: "no failure cases recorded for these runs"}));
      add(more, el("h3", {text: "Runs"}), runsTable(d));
      add(more, el("h3", {text: "Configuration" + (d.config_key ? " " + d.config_key : "")}),
          el("table", {"class": "kv config"}, configKeys(d.spec).map(function (k) {
            var v = k in d.spec ? d.spec[k] : D.spec[k];
            return el("tr", null, el("th", {text: k}), el("td", {text: typeof v === "string" ? v : JSON.stringify(v)}));
          })));
    });
    return box;
  }
  // a row's configuration: the entries all rows share (D.spec) and its own (spec), sorted
  function configKeys(spec) {
    return Object.keys(D.spec).filter(function (k) { return !(k in spec); }).concat(Object.keys(spec)).sort();
  }
  function runsTable(d) {
    return el("div", {"class": "scroll"}, el("table", {"class": "runs"},
      el("thead", null, el("tr", null, ["seed", "status", "run", "code", "finished"].concat(d.metrics, ["error"]).map(function (h) {
        return el("th", {text: h}); }))),
      el("tbody", null, d.runs.map(function (run) {
        return el("tr", {"class": "status-" + run.status}, [String(run.seed), run.status, run.key.slice(0, 16), run.fingerprint, run.finished]
          .concat(d.metrics.map(function (m) { return fmt(run.metrics[m]); }), [run.error]).map(function (t) {
            return el("td", {text: t}); }));
      }))));
  }
  function renderCompare(ids) {
    var box = el("div", {id: "compare-view"}, el("p", null, el("a", {href: "#table", text: "\u2190 table"})),
                 el("h2", {text: "Compare: the same fixed prompts side by side"}));
    if (!ids.length) { add(box, el("p", {text: "Tick rows in the table, then Compare selected."})); return box; }
    var body = el("div", {"class": "loading", text: "loading\u2026"});
    add(box, body);
    loadRows(ids, function (got) {
      clear(body).className = "";
      var sheets = ids.map(function (i) { return got[i] && got[i].sheets.filter(function (s) { return !s.missing; })[0]; });
      var ref = sheets.filter(Boolean)[0];
      if (!ref) { add(body, el("p", {text: "none of these rows has sample-sheet snapshots"})); return; }
      var steps = [];
      sheets.forEach(function (s) { if (s) s.steps.forEach(function (x) { if (steps.indexOf(x.step) < 0) steps.push(x.step); }); });
      steps.sort(function (a, b) { return a - b; });
      var sel = el("select", {id: "compare-step", "aria-label": "training step"}, el("option", {value: "final", text: "final step of each"}),
                   steps.map(function (s) { return el("option", {value: String(s), text: "step " + s}); }));
      sel.value = steps.indexOf(Number(state.cmpStep)) >= 0 ? state.cmpStep : "final";
      var grid = el("div");
      function same(a, b) { return a.length === b.length && a.every(function (p, k) { return p === b[k]; }); }
      function draw() {
        state.cmpStep = sel.value;
        clear(grid);
        var head = el("tr", null, el("th", {text: "prompt"}), ids.map(function (i, c) {
          var s = sheets[c], at = pickStep(s);
          return el("th", null, el("a", {href: "#row/" + i, text: rowLabel(i)}),
                    el("div", {"class": "meta", text: s ? "seed " + s.seed + (at ? ", step " + at.step : "") : ""}));
        }));
        function pickStep(s) {
          if (!s || !s.steps.length) return null;
          if (sel.value === "final") return s.steps[s.steps.length - 1];
          return s.steps.filter(function (x) { return String(x.step) === sel.value; })[0] || null;
        }
        var rows = ref.prompts.map(function (prompt, p) {
          return el("tr", null, el("th", {"class": "prompt", text: prompt}), ids.map(function (i, c) {
            var s = sheets[c];
            if (!s) return el("td", null, hole(got[i] ? "no sample sheet" : "details missing"));
            if (!same(s.prompts, ref.prompts)) return el("td", null, hole("other prompts"));
            var at = pickStep(s);
            return el("td", null, at ? sheetTile(s, at, p, 3) : hole("no snapshot at step " + sel.value));
          }));
        });
        add(grid, el("div", {"class": "scroll"}, el("table", {"class": "sheet compare"}, el("thead", null, head), el("tbody", null, rows))));
      }
      sel.addEventListener("change", draw);
      add(body, el("label", null, "show ", sel), grid);
      draw();
    });
    return box;
  }
  function renderPareto() {
    var P = D.pareto, box = el("div", {id: "pareto-view"}, el("h2", {text: "Quality vs throughput (Pareto)"}));
    if (!P || P.reason) { add(box, el("p", {text: "no Pareto plot: " + (P ? P.reason : "no data")})); return box; }
    var methods = [];
    P.points.forEach(function (p) { var m = D.rows[p.row].cells[0]; if (methods.indexOf(m) < 0) methods.push(m); });
    var xs = [], ys = [];
    P.points.forEach(function (p) { xs.push(p.x - (p.xerr || 0), p.x + (p.xerr || 0)); ys.push(p.y - (p.yerr || 0), p.y + (p.yerr || 0)); });
    var front = P.front.map(function (r) { return P.points.filter(function (p) { return p.row === r; })[0]; });
    add(box, chart({width: 760, height: 440, x: {domain: extent(xs), label: P.xlabel}, y: {domain: extent(ys), label: P.ylabel},
                    title: P.metric + " vs " + P.cost + " (row means \u00b1 std over seeds; dashed: Pareto front)"},
      function (g, x, y) {
        if (front.length > 1) add(g, svg("path", {d: path(front.map(function (p) { return x(p.x); }), front.map(function (p) { return y(p.y); })),
                                                   "class": "front"}));
        P.points.forEach(function (p) {
          var c = colour(methods.indexOf(D.rows[p.row].cells[0]));
          var a = svg("a", {href: "#row/" + p.row, "class": "point"});
          if (p.xerr) add(a, svg("line", {x1: x(p.x - p.xerr), x2: x(p.x + p.xerr), y1: y(p.y), y2: y(p.y), "class": "err " + c}));
          if (p.yerr) add(a, svg("line", {x1: x(p.x), x2: x(p.x), y1: y(p.y - p.yerr), y2: y(p.y + p.yerr), "class": "err " + c}));
          if (P.front.indexOf(p.row) >= 0) add(a, svg("circle", {cx: x(p.x), cy: y(p.y), r: 8, "class": "ring"}));
          add(a, svg("circle", {cx: x(p.x), cy: y(p.y), r: 4, "class": "dot " + c}),
              svg("title", {text: rowLabel(p.row) + ": " + P.metric + " " + fmt(p.y) + ", " + P.cost + " " + fmt(p.x)}));
          add(g, a);
        });
      }));
    add(box, el("ul", {"class": "legend"}, methods.map(function (m, k) {
      return el("li", null, el("span", {"class": "swatch " + colour(k)}), m); })));
    add(box, el("p", {"class": "meta", text: "On the front: " + P.front.map(rowLabel).join("; ")}));
    return box;
  }

  // ------------------------------------------------------------------ study
  function renderStudy() {
    var S = D.study, box = el("div", {id: "study-view"});
    if (!S) { add(box, el("p", {text: "this report is not of a study (ablate report --study NAME)"})); return box; }
    var c = S.counts;
    add(box, el("h2", {text: "Study " + S.name}),
        el("p", {text: S.metrics.map(function (m, k) { return m + " (" + S.directions[k] + ")"; }).join(", ") + " \u2014 " +
                 c.COMPLETE + " complete, " + c.PRUNED + " pruned, " + c.FAIL + " failed, " + c.RUNNING + " running trials"}));
    S.history.forEach(function (h) {
      add(box, el("h3", {text: "Optimisation history: " + h.metric}));
      if (!h.number.length) { add(box, el("p", {text: "no complete trial yet"})); return; }
      add(box, chart({width: 640, height: 300, x: {domain: extent(h.number), label: "trial", ticks: integerTicks(extent(h.number))}, y: {domain: extent(h.value), label: h.metric}},
        function (g, x, y) {
          var d = "";
          h.number.forEach(function (n, k) { d += (k ? "H" + x(n).toFixed(1) + "V" : "M" + x(n).toFixed(1) + ",") + y(h.best[k]).toFixed(1); });
          add(g, svg("path", {d: d, "class": "line c1"}));
          h.number.forEach(function (n, k) {
            add(g, svg("circle", {cx: x(n), cy: y(h.value[k]), r: 3.5, "class": "dot c0 trial"}, svg("title", {text: "trial " + n + ": " + fmt(h.value[k])})));
          });
        }));
    });
    Object.keys(S.importances).forEach(function (m) {
      var imp = S.importances[m], keys = Object.keys(imp.values);
      add(box, el("h3", {text: "Parameter importances (fANOVA): " + m}));
      if (!keys.length) { add(box, el("p", {text: "not computable: " + imp.reason})); return; }
      add(box, el("table", {"class": "importances"}, keys.map(function (k) {
        var bar = el("div", {"class": "bar"});
        bar.style.width = Math.round(imp.values[k] * 300) + "px";
        return el("tr", null, el("th", {text: k}), el("td", null, bar), el("td", {text: imp.values[k].toFixed(3)}));
      })));
    });
    add(box, el("h3", {text: "Parallel coordinates (drag along an axis to select a range)"}), parallel(S));
    add(box, el("h3", {text: "Trials"}), trialsTable(S));
    return box;
  }
  function parallel(S) {
    var done = S.trials.filter(function (t) { return t.values; });
    if (!done.length) return el("p", {text: "no complete trial yet"});
    var axes = S.axes.map(function (a) { return {name: a.name, a: a, get: function (t) { return t.params[a.name]; }}; });
    S.metrics.forEach(function (m, k) {
      var vals = done.map(function (t) { return t.values[k]; }), e = extent(vals, 0);
      axes.push({name: m, a: {kind: "numeric", low: e[0], high: e[1]}, get: function (t) { return t.values[k]; }, objective: true});
    });
    var W = Math.max(480, 150 * axes.length), H = 340, top = 30, bottom = H - 40;
    function pos(ax, v) {
      var a = ax.a;
      if (v === null || v === undefined) return null;
      if (a.kind === "categorical") {
        var k = a.choices.indexOf(String(v));
        return a.choices.length > 1 ? bottom - k / (a.choices.length - 1) * (bottom - top) : (top + bottom) / 2;
      }
      var f = a.log ? Math.log10 : function (u) { return u; }, lo = f(a.low), hi = f(a.high);
      return bottom - (f(v) - lo) / (hi - lo || 1) * (bottom - top);
    }
    var root = svg("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, "class": "chart parallel"});
    var xOf = function (k) { return 60 + k * (W - 120) / Math.max(1, axes.length - 1); };
    var obj = axes[axes.length - S.metrics.length], objVals = done.map(function (t) { return obj.get(t); });
    var oe = extent(objVals, 0), brushes = {};
    var lines = done.map(function (t) {
      var pts = axes.map(function (ax, k) { var py = pos(ax, ax.get(t)); return py === null ? null : xOf(k).toFixed(1) + "," + py.toFixed(1); });
      var v = obj.get(t), q = (v - oe[0]) / (oe[1] - oe[0] || 1);
      if (S.directions[0] === "maximize") q = 1 - q;
      var line = svg("polyline", {points: pts.filter(Boolean).join(" "), "class": "trial-line q" + Math.min(4, Math.floor(q * 5))},
                     svg("title", {text: "trial " + t.number}));
      line.trial = t;
      return line;
    });
    add(root, lines);
    axes.forEach(function (ax, k) {
      var g = svg("g", {"class": "pc-axis" + (ax.objective ? " objective" : "")});
      add(g, svg("line", {x1: xOf(k), x2: xOf(k), y1: top, y2: bottom}), svg("text", {x: xOf(k), y: top - 10, "text-anchor": "middle", text: ax.name}));
      var a = ax.a, labels = a.kind === "categorical" ? a.choices : [a.low, a.high];
      labels.forEach(function (v) {
        var py = pos(ax, v);
        add(g, svg("text", {x: xOf(k) + 6, y: py + 4, "class": "tick", text: typeof v === "number" ? fmt(v) : v}));
      });
      var brush = svg("rect", {x: xOf(k) - 8, y: top, width: 16, height: 0, "class": "brush"});
      var hit = svg("rect", {x: xOf(k) - 10, y: top, width: 20, height: bottom - top, "class": "hit"});
      var y0 = null;
      function yAt(e) { var r = root.getBoundingClientRect(); return (e.clientY - r.top) * H / r.height; }
      hit.addEventListener("mousedown", function (e) { y0 = yAt(e); e.preventDefault(); });
      root.addEventListener("mousemove", function (e) {
        if (y0 === null) return;
        var y1 = yAt(e), lo = Math.max(top, Math.min(y0, y1)), hi = Math.min(bottom, Math.max(y0, y1));
        brush.setAttribute("y", lo); brush.setAttribute("height", hi - lo);
        brushes[k] = hi - lo > 2 ? [lo, hi] : null;
        applyBrushes();
      });
      window.addEventListener("mouseup", function () { y0 = null; });
      add(g, brush, hit);
      add(root, g);
    });
    function applyBrushes() {
      lines.forEach(function (line) {
        var keep = axes.every(function (ax, k) {
          var b = brushes[k]; if (!b) return true;
          var py = pos(ax, ax.get(line.trial)); return py !== null && py >= b[0] && py <= b[1];
        });
        line.setAttribute("class", line.getAttribute("class").replace(/ dim/g, "") + (keep ? "" : " dim"));
      });
    }
    return el("div", {"class": "scroll"}, root);
  }
  function trialsTable(S) {
    var params = S.axes.map(function (a) { return a.name; });
    return el("div", {"class": "scroll"}, el("table", {"class": "runs trials"},
      el("thead", null, el("tr", null, ["#", "state"].concat(S.metrics, params, ["run"]).map(function (h) { return el("th", {text: h}); }))),
      el("tbody", null, S.trials.map(function (t) {
        var cells = [String(t.number), t.state].concat(S.metrics.map(function (m, k) { return t.values ? fmt(t.values[k]) : "-"; }),
                                                       params.map(function (p) { var v = t.params[p]; return typeof v === "number" ? fmt(v) : (v === undefined ? "-" : v); }));
        return el("tr", {"class": "state-" + t.state}, cells.map(function (x) { return el("td", {text: x}); }),
                  el("td", null, t.row === null || t.row === undefined ? (t.key || "-").slice(0, 12) : el("a", {href: "#row/" + t.row, text: t.key.slice(0, 12)})));
      }))));
  }

  // ------------------------------------------------------------------ routing
  function render() {
    var h = location.hash.replace(/^#/, ""), parts = h.split("/"), view;
    if (parts[0] === "row") view = renderRow(Number(parts[1]));
    else if (parts[0] === "compare") {
      var ids = (parts[1] || "").split(",").filter(function (x) { return /^\d+$/.test(x) && D.rows[Number(x)]; }).map(Number);
      view = renderCompare(ids);
    } else if (parts[0] === "pareto") view = renderPareto();
    else if (parts[0] === "study") view = renderStudy();
    else view = renderTable();
    clear(app);
    add(app, view);
    var nav = document.querySelectorAll("nav a");
    for (var k = 0; k < nav.length; k++) nav[k].classList.toggle("active", nav[k].getAttribute("href").split("/")[0] === "#" + (parts[0] || "table"));
  }
  function start() {
    var nav = document.getElementById("nav");
    add(nav, el("a", {href: "#table", text: "Table"}), el("a", {href: "#compare/" + state.selected.join(","), id: "nav-compare", text: "Compare"}),
        el("a", {href: "#pareto", text: "Pareto"}), D.study ? el("a", {href: "#study", text: "Study"}) : null);
    nav.querySelector("#nav-compare").addEventListener("click", function (e) {
      e.preventDefault(); location.hash = "#compare/" + state.selected.join(",");
    });
    add(clear(document.getElementById("meta")), D.meta.rows + " rows from " + D.meta.runs + " runs \u2014 database " + D.meta.db +
        (D.meta.baseline ? " \u2014 baseline " + D.meta.baseline.label : "") + " \u2014 made " + D.meta.generated);
    window.addEventListener("hashchange", function () { window.scrollTo(0, 0); render(); });
    render();
    document.body.setAttribute("data-ready", "1");
    window.ABLATE_READY_MS = performance.now();
  }
  start();
})();
