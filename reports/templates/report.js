/* keh report: sortable tables and the per-case explorer. No network, no library.
   The explorer's data (reports/explorer.py) is gzip-compressed JSON in base64 inside
   <script id="case-data">; strings are indices into doc.strings. */
(function () {
  "use strict";

  // ------------------------------------------------------------ sortable tables
  function cellKey(cell) {
    const s = cell.getAttribute("data-s");
    const text = cell.textContent.trim();
    return { num: s === null ? null : Number(s), text: text };
  }

  function isMissing(key) {
    return key.num === null && (key.text === "" || key.text === "–");
  }

  function compareKeys(a, b) {
    if (a.num !== null && b.num !== null) {
      return a.num === b.num ? 0 : (a.num < b.num ? -1 : 1);
    }
    if (a.num !== null) return -1;
    if (b.num !== null) return 1;
    return a.text.localeCompare(b.text, undefined, { numeric: true });
  }

  function sortTable(table, col, dir) {
    const body = table.tBodies[0];
    const keyed = Array.from(body.rows).map(function (row, i) {
      return { row: row, i: i, key: cellKey(row.cells[col]) };
    });
    keyed.sort(function (x, y) {
      const mx = isMissing(x.key), my = isMissing(y.key);
      if (mx !== my) return mx ? 1 : -1;  // missing values last in both directions
      const c = compareKeys(x.key, y.key);
      if (c !== 0) return dir === "ascending" ? c : -c;
      return x.i - y.i;
    });
    const frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k.row); });
    body.appendChild(frag);
    table.querySelectorAll("thead th").forEach(function (th, j) {
      th.setAttribute("aria-sort", j === col ? dir : "none");
    });
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead button.sort").forEach(function (btn) {
      btn.addEventListener("click", function () {
        const th = btn.closest("th");
        const dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        sortTable(table, Number(btn.dataset.col), dir);
      });
    });
  });

  // ------------------------------------------------------------ explorer
  const root = document.getElementById("explorer");
  const dataEl = document.getElementById("case-data");
  if (!root || !dataEl) return;
  const $ = function (id) { return document.getElementById(id); };
  const status = $("ex-status");
  const GROUP_NAMES = { efficacy: "rewrite", paraphrase: "paraphrase",
                        neighborhood: "neighbourhood" };
  const GROUP_ORDER = Object.keys(GROUP_NAMES);
  const CONDITIONS = {
    rate: [["", "(any)"], ["eq100", "= 100% (succeeded)"], ["eq0", "= 0% (failed)"],
           ["lt100", "< 100%"], ["gt0", "> 0%"]],
    real: [["", "(any)"], ["gt0", "> 0"], ["le0", "≤ 0"]],
    flag: [["", "(any)"], ["yes", "yes"], ["no", "no"]],
  };
  const MAX_DEFAULT_ARMS = 6;
  let doc = null;
  const state = { g: 0, lead: [], text: "", sort: "", dir: "asc", size: 25, page: 0 };
  let matching = [];

  function str(i) { return i === null || i === undefined ? "" : doc.strings[i]; }
  function group() { return doc.groups[state.g]; }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function option(select, value, label) {
    select.appendChild(el("option", { value: value }, [label]));
  }

  async function decode(text) {
    const bin = atob(text.trim());
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  function metricIndex(g, label) {
    for (let m = 0; m < g.metrics.length; m++) if (g.metrics[m].label === label) return m;
    return -1;
  }

  function armIndex(g, name) {
    for (let a = 0; a < g.arms.length; a++) {
      if (g.arms[a].label.split(" [")[0] === name) return a;
    }
    return -1;
  }

  function fmt(v, kind) {
    if (v === null || v === undefined) return "–";
    return kind === "rate" ? String(Math.round(v * 10) / 10) : String(v);
  }

  function mark(v) {
    if (v === null || v === undefined) return "–";
    if (v === 100) return "✓";
    if (v === 0) return "✗";
    return String(Math.round(v));
  }

  // ---------------------------------------------------------- controls
  function setupGroup() {
    const g = group();
    $("ex-note").textContent = g.note + (g.arms.length > MAX_DEFAULT_ARMS
      ? " " + g.arms.length + " methods: the first " + MAX_DEFAULT_ARMS
        + " (with the baseline and the treatment) are shown; tick others below." : "");
    const base = armIndex(g, root.dataset.baseline), treat = armIndex(g, root.dataset.treatment);
    const first = [treat, base].filter(function (a) { return a >= 0; });
    state.lead = first.slice();
    for (let a = 0; a < g.arms.length && first.length < MAX_DEFAULT_ARMS; a++) {
      if (first.indexOf(a) < 0) first.push(a);
    }
    const box = $("ex-arms");
    box.querySelectorAll("label").forEach(function (n) { n.remove(); });
    g.arms.forEach(function (arm, a) {
      const input = el("input", { type: "checkbox", value: String(a) });
      input.checked = first.indexOf(a) >= 0;
      input.addEventListener("change", update);
      box.appendChild(el("label", {}, [input, " " + arm.label]));
    });
    document.querySelectorAll(".rule").forEach(function (rule) {
      const armSel = rule.querySelector(".rule-arm"), metSel = rule.querySelector(".rule-metric");
      armSel.textContent = ""; metSel.textContent = "";
      option(armSel, "-1", "(none)");
      g.arms.forEach(function (arm, a) { option(armSel, String(a), arm.label); });
      g.metrics.forEach(function (m, k) { option(metSel, String(k), m.label); });
      option(metSel, "failed", "edit failed");
      setConditions(rule);
    });
    const sort = $("ex-sort");
    sort.textContent = "";
    option(sort, "", "case order");
    g.arms.forEach(function (arm, a) {
      g.metrics.forEach(function (m, k) { option(sort, a + ":" + k, arm.label + ": " + m.label); });
    });
    const contrast = $("ex-contrast");
    const eff = metricIndex(g, "Eff");
    contrast.hidden = !(base >= 0 && treat >= 0 && eff >= 0);
    contrast.textContent = "Show where " + root.dataset.treatment + " succeeded and "
      + root.dataset.baseline + " failed (Eff)";
  }

  function setConditions(rule) {
    const g = group();
    const metric = rule.querySelector(".rule-metric").value;
    const kind = metric === "failed" ? "flag" : g.metrics[Number(metric)].kind;
    const cond = rule.querySelector(".rule-cond");
    const before = cond.value;
    cond.textContent = "";
    CONDITIONS[kind].forEach(function (c) { option(cond, c[0], c[1]); });
    cond.value = CONDITIONS[kind].some(function (c) { return c[0] === before; }) ? before : "";
  }

  function readRules() {
    return Array.from(document.querySelectorAll(".rule")).map(function (rule) {
      return { arm: Number(rule.querySelector(".rule-arm").value),
               metric: rule.querySelector(".rule-metric").value,
               cond: rule.querySelector(".rule-cond").value };
    }).filter(function (r) { return r.arm >= 0 && r.cond !== ""; });
  }

  function passes(rule, g, i) {
    if (rule.metric === "failed") {
      const f = g.failed[rule.arm][i];
      return rule.cond === "yes" ? f > 0 : f === 0;
    }
    const v = g.values[rule.arm][Number(rule.metric)][i];
    if (v === null || v === undefined) return false;
    switch (rule.cond) {
      case "eq100": return v === 100;
      case "eq0": return v === 0;
      case "lt100": return v < 100;
      case "gt0": return v > 0;
      case "le0": return v <= 0;
      default: return true;
    }
  }

  function haystack(g) {
    if (!g.hay) {
      const c = g.cases;
      g.hay = c.id.map(function (id, i) {
        const parts = [str(id)];
        ["subject", "prompt", "new", "true"].forEach(function (k) {
          if (c[k]) parts.push(str(c[k][i]));
        });
        const items = c.items ? c.items[i] : null;
        if (items) {
          Object.keys(items).forEach(function (grp) {
            items[grp].forEach(function (pr) { parts.push(str(pr[0]), str(pr[1])); });
          });
        }
        g.answers.forEach(function (ans) {
          if (!ans) return;
          Object.keys(ans).forEach(function (grp) {
            (ans[grp][i] || []).forEach(function (s) { parts.push(str(s)); });
          });
        });
        return parts.join("\n").toLowerCase();
      });
    }
    return g.hay;
  }

  function filter() {
    const g = group();
    const rules = readRules();
    const text = state.text.trim().toLowerCase();
    const hay = text ? haystack(g) : null;
    const out = [];
    for (let i = 0; i < g.cases.id.length; i++) {
      if (hay && hay[i].indexOf(text) < 0) continue;
      let ok = true;
      for (let r = 0; r < rules.length && ok; r++) ok = passes(rules[r], g, i);
      if (ok) out.push(i);
    }
    if (state.sort) {
      const parts = state.sort.split(":");
      const col = g.values[Number(parts[0])][Number(parts[1])];
      const sign = state.dir === "desc" ? -1 : 1;
      out.sort(function (x, y) {
        const a = col[x], b = col[y];
        const ma = a === null || a === undefined, mb = b === null || b === undefined;
        if (ma !== mb) return ma ? 1 : -1;
        if (!ma && a !== b) return sign * (a < b ? -1 : 1);
        return x - y;
      });
    } else if (state.dir === "desc") {
      out.reverse();
    }
    return out;
  }

  // ---------------------------------------------------------- rendering
  function armCell(g, a, i) {
    const labels = ["Eff", "Gen", "Spe"];
    const idx = labels.map(function (l) { return metricIndex(g, l); });
    const margin = metricIndex(g, "Margin");
    const vals = idx.map(function (m) { return m >= 0 ? g.values[a][m][i] : null; });
    const shown = [], spoken = [];
    idx.forEach(function (m, k) {
      if (m < 0) return;
      shown.push(mark(vals[k]));
      spoken.push(labels[k] + " " + fmt(vals[k], "rate") + (vals[k] === null ? "" : "%"));
    });
    if (margin >= 0) {
      const v = g.values[a][margin][i];
      shown.push(v === null ? "–" : (v > 0 ? "+" : "") + Number(v.toPrecision(3)));
      spoken.push("margin " + fmt(v, "real"));
    }
    const td = el("td", { class: "arm" });
    if (vals[0] === 100) td.classList.add("ok");
    if (vals[0] === 0) td.classList.add("bad");
    td.appendChild(el("span", { "aria-hidden": "true" }, [shown.join(" ")]));
    td.appendChild(el("span", { class: "sr" }, [spoken.join(", ")]));
    if (g.failed[a][i] > 0) {
      td.appendChild(el("span", { class: "failed" },
                        [" edit failed" + (g.failed[a][i] > 1 ? " ×" + g.failed[a][i] : "")]));
    }
    return td;
  }

  function editCell(g, i) {
    const c = g.cases;
    if (!c.prompt) return el("td", {}, ["(no prompts: see the note above)"]);
    return el("td", {}, [str(c.prompt[i]) + " → ", el("strong", {}, [str(c.new[i])]),
                         " (true: " + str(c.true[i]) + ")"]);
  }

  function detailTable(caption, head, rows) {
    const table = el("table", {}, [el("caption", {}, [caption])]);
    const tr = el("tr");
    head.forEach(function (h) { tr.appendChild(el("th", { scope: "col" }, [h])); });
    table.appendChild(el("thead", {}, [tr]));
    const body = el("tbody");
    rows.forEach(function (cells) {
      const row = el("tr");
      cells.forEach(function (v, k) {
        row.appendChild(k === 0 ? el("th", { scope: "row" }, [v]) : el("td", {}, [v]));
      });
      body.appendChild(row);
    });
    table.appendChild(body);
    return table;
  }

  function detail(g, i, arms, span) {
    const c = g.cases;
    const td = el("td", { colspan: String(span) });
    const facts = [["Case", str(c.id[i])], ["Batch", c.batch[i] === null ? "–" : String(c.batch[i])]];
    if (c.prompt) {
      facts.push(["Subject", str(c.subject[i])], ["Rewrite prompt", str(c.prompt[i])],
                 ["Target (new)", str(c.new[i])], ["True object", str(c.true[i])]);
    }
    const dl = el("dl", { class: "case" });
    facts.forEach(function (f) { dl.appendChild(el("dt", {}, [f[0]])); dl.appendChild(el("dd", {}, [f[1]])); });
    td.appendChild(dl);
    const head = ["Method"].concat(g.metrics.map(function (m) { return m.label + (m.kind === "rate" ? " (%)" : ""); }),
                                   ["failed edits", "seeds"]);
    td.appendChild(detailTable("Outcomes (means over the method's seeds)", head, arms.map(function (a) {
      return [g.arms[a].label].concat(g.metrics.map(function (m, k) { return fmt(g.values[a][k][i], m.kind); }),
                                      [String(g.failed[a][i]), g.arms[a].seeds.join(", ") || "–"]);
    })));
    const groups = [];
    const items = c.items ? c.items[i] : null;
    arms.forEach(function (a) {
      const ans = g.answers[a];
      if (ans) Object.keys(ans).forEach(function (k) { if (groups.indexOf(k) < 0) groups.push(k); });
    });
    if (items) Object.keys(items).forEach(function (k) { if (groups.indexOf(k) < 0) groups.push(k); });
    const rank = function (k) { const r = GROUP_ORDER.indexOf(k); return r < 0 ? GROUP_ORDER.length : r; };
    groups.sort(function (x, y) { return rank(x) - rank(y); });
    const rows = [];
    groups.forEach(function (grp) {
      let n = items && items[grp] ? items[grp].length : 0;
      arms.forEach(function (a) {
        const ans = g.answers[a];
        if (ans && ans[grp]) n = Math.max(n, (ans[grp][i] || []).length);
      });
      for (let k = 0; k < n; k++) {
        const pr = items && items[grp] ? items[grp][k] : null;
        rows.push([(GROUP_NAMES[grp] || grp) + " " + (k + 1), pr ? str(pr[0]) : "(prompt not available)",
                   pr ? str(pr[1]) : "–"].concat(arms.map(function (a) {
          const ans = g.answers[a];
          const list = ans && ans[grp] ? ans[grp][i] || [] : [];
          return k < list.length ? "“" + str(list[k]) + "”" : "–";
        })));
      }
    });
    if (rows.length) {
      td.appendChild(detailTable("Prompts and the answers each method generated (greedy, cut at the first line or "
        + "sentence end; seed: " + arms.map(function (a) { return g.arms[a].label + " s" + g.arms[a].answer_seed; }).join(", ") + ")",
        ["Prompt", "Text", "Reference"].concat(arms.map(function (a) { return g.arms[a].label; })), rows));
    } else {
      td.appendChild(el("p", {}, ["No generated answers recorded (runs without --answer-tokens)."]));
    }
    arms.forEach(function (a) {
      const gens = g.generations[a] ? g.generations[a][i] : null;
      if (!gens || !gens.length) return;
      const box = el("details", {}, [el("summary", {}, ["Generations of " + g.arms[a].label + " (fluency, first "
        + gens.length + ", cut to 300 characters)"])]);
      gens.forEach(function (s) { box.appendChild(el("pre", { class: "gen" }, [str(s)])); });
      td.appendChild(box);
    });
    return el("tr", { class: "detail", id: "ex-detail-" + i }, [td]);
  }

  function render() {
    const g = group();
    // the treatment and the baseline first, then the other ticked methods in report order
    const ticked = Array.from($("ex-arms").querySelectorAll("input:checked")).map(function (n) { return Number(n.value); });
    const arms = state.lead.filter(function (a) { return ticked.indexOf(a) >= 0; }).concat(
      ticked.filter(function (a) { return state.lead.indexOf(a) < 0; }));
    const total = matching.length;
    const pages = Math.max(1, Math.ceil(total / state.size));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * state.size, end = Math.min(total, start + state.size);
    const table = el("table", { class: "cases", id: "ex-table" });
    table.appendChild(el("caption", {}, [g.title + ": cases " + (total ? start + 1 : 0) + "–" + end + " of " + total + " matching"]));
    const head = el("tr", {}, [el("th", { scope: "col" }, ["Case"]), el("th", { scope: "col" }, ["Edit"])]);
    arms.forEach(function (a) { head.appendChild(el("th", { scope: "col" }, [g.arms[a].label])); });
    table.appendChild(el("thead", {}, [head]));
    const body = el("tbody");
    for (let r = start; r < end; r++) {
      const i = matching[r];
      const btn = el("button", { type: "button", "aria-expanded": "false", "aria-controls": "ex-detail-" + i,
                                 class: "show" }, ["Show"]);
      const tr = el("tr", { "data-case": str(g.cases.id[i]) },
                    [el("th", { scope: "row" }, [btn, " " + str(g.cases.id[i])]), editCell(g, i)]);
      arms.forEach(function (a) { tr.appendChild(armCell(g, a, i)); });
      btn.addEventListener("click", function () {
        const open = btn.getAttribute("aria-expanded") === "true";
        const next = tr.nextSibling;
        if (open) {
          if (next && next.classList && next.classList.contains("detail")) next.remove();
          btn.setAttribute("aria-expanded", "false");
          btn.textContent = "Show";
        } else {
          tr.after(detail(g, i, arms, arms.length + 2));
          btn.setAttribute("aria-expanded", "true");
          btn.textContent = "Hide";
        }
      });
      body.appendChild(tr);
    }
    table.appendChild(body);
    const box = $("ex-results");
    box.textContent = "";
    box.appendChild(table);
    status.textContent = "Showing " + (total ? start + 1 : 0) + "–" + end + " of " + total
      + " matching cases (" + g.cases.id.length + " in all).";
    $("ex-page").textContent = "Page " + (state.page + 1) + " of " + pages;
    $("ex-prev").disabled = state.page === 0;
    $("ex-next").disabled = state.page >= pages - 1;
  }

  function update() {
    state.sort = $("ex-sort").value;
    state.dir = $("ex-dir").value;
    state.size = Number($("ex-size").value);
    state.text = $("ex-text").value;
    state.page = 0;
    matching = filter();
    render();
  }

  function wire() {
    $("ex-group").addEventListener("change", function () {
      state.g = Number($("ex-group").value);
      setupGroup();
      update();
    });
    document.querySelectorAll(".rule").forEach(function (rule) {
      rule.querySelector(".rule-metric").addEventListener("change", function () { setConditions(rule); update(); });
      rule.querySelector(".rule-arm").addEventListener("change", update);
      rule.querySelector(".rule-cond").addEventListener("change", update);
    });
    ["ex-sort", "ex-dir", "ex-size"].forEach(function (id) { $(id).addEventListener("change", update); });
    let timer = null;
    $("ex-text").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(update, 150);
    });
    $("ex-form").addEventListener("submit", function (e) { e.preventDefault(); update(); });
    $("ex-prev").addEventListener("click", function () { state.page -= 1; render(); });
    $("ex-next").addEventListener("click", function () { state.page += 1; render(); });
    $("ex-clear").addEventListener("click", function () {
      document.querySelectorAll(".rule").forEach(function (rule) {
        rule.querySelector(".rule-arm").value = "-1";
        rule.querySelector(".rule-cond").value = "";
      });
      $("ex-text").value = "";
      update();
    });
    $("ex-contrast").addEventListener("click", function () {
      const g = group();
      const eff = String(metricIndex(g, "Eff"));
      const rules = document.querySelectorAll(".rule");
      [[root.dataset.treatment, "eq100"], [root.dataset.baseline, "eq0"]].forEach(function (spec, k) {
        const rule = rules[k];
        rule.querySelector(".rule-arm").value = String(armIndex(g, spec[0]));
        rule.querySelector(".rule-metric").value = eff;
        setConditions(rule);
        rule.querySelector(".rule-cond").value = spec[1];
      });
      update();
    });
  }

  const t0 = performance.now();
  decode(dataEl.textContent).then(function (d) {
    doc = d;
    const sel = $("ex-group");
    doc.groups.forEach(function (g, k) { option(sel, String(k), g.title + " (" + g.cases.id.length + " cases)"); });
    if (!doc.groups.length) {
      status.textContent = "No cases.";
      root.dataset.ready = "1";
      return;
    }
    setupGroup();
    wire();
    update();
    root.dataset.decodeMs = String(Math.round(performance.now() - t0));
    root.dataset.readyMs = String(Math.round(performance.now()));
    root.dataset.ready = "1";
  }).catch(function (err) {
    status.textContent = "The explorer could not read its data: " + err;
    root.dataset.failed = "1";
    console.error(err);
  });
})();
