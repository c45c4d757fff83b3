// asyncbg dashboard: polls the JSON endpoints next to this page and updates the
// tables in place (rows keyed by name or job id). No framework, no build step.
(() => {
  "use strict";
  const body = document.body;
  const base = body.dataset.base; // ends with "/"
  const refreshMs = Number(body.dataset.refreshMs) || 1000;
  const canControl = body.dataset.canControl === "true";
  const controlHeaders = { [body.dataset.csrfHeader]: body.dataset.csrfValue };
  let clockOffset = 0; // server time minus local time, in seconds
  let timer = null;

  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000 + clockOffset;

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  }

  function seconds(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "–";
    if (s < 0.001) return "<1 ms";
    if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
    if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }
  function clock(epoch) {
    if (!epoch) return "–";
    const d = new Date(epoch * 1000);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${Math.floor(d.getMilliseconds() / 100)}`;
  }
  const ago = (epoch) => (epoch ? `${seconds(Math.max(0, now() - epoch))} ago` : "–");
  const shortId = (id) => id.slice(0, 8);

  function setText(row, field, text) {
    const cell = row.querySelector(`[data-field="${field}"]`);
    if (cell && cell.textContent !== String(text)) cell.textContent = text;
    return cell;
  }
  function setStatus(node, status) {
    node.textContent = status;
    node.dataset.status = status;
  }

  // Keep tbody's rows in the order of items, reusing rows with the same key.
  function syncRows(tbody, items, keyOf, create, update) {
    const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
    let prev = null;
    for (const item of items) {
      const key = keyOf(item);
      let tr = old.get(key);
      if (tr) old.delete(key);
      else {
        tr = create(item);
        tr.dataset.key = key;
      }
      update(tr, item);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (tr !== want) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const tr of old.values()) tr.remove();
    // Until the first answer the placeholder says "Loading…": an empty table
    // before anything was fetched would claim there is nothing.
    const empty = document.querySelector(`[data-empty-for="${tbody.id}"]`);
    if (empty) {
      empty.textContent = empty.dataset.emptyText;
      empty.classList.remove("loading");
      empty.hidden = items.length > 0;
    }
  }

  function bar(fraction, cls = "") {
    const fill = el("span");
    const node = el("div", { class: `bar ${cls}` }, fill);
    node.setBar = (f) => {
      const pct = Math.max(0, Math.min(1, f)) * 100;
      fill.style.width = `${pct}%`;
      node.dataset.fraction = String(f);
      node.classList.toggle("full", f >= 1);
      node.classList.toggle("high", f >= 0.8 && f < 1);
    };
    node.setBar(fraction);
    return node;
  }

  function actionButton(label, cls, onClick) {
    const b = el("button", { type: "button", class: cls, textContent: label });
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await onClick();
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  function showResult(text, isError) {
    const p = $("action-result");
    p.textContent = text;
    p.classList.toggle("error", !!isError);
    p.hidden = false;
  }

  // POST a control request; say what came of it (describe(data) on success).
  async function post(path, what, describe) {
    try {
      const r = await fetch(base + path, { method: "POST", headers: controlHeaders, cache: "no-store" });
      const data = await r.json().catch(() => ({}));
      if (r.ok) showResult(`${what}: ${describe(data)}`, false);
      else showResult(`${what}: ${data.error || r.status}`, true);
    } catch (e) {
      showResult(`${what}: ${e}`, true);
    }
    refreshSoon(0);
  }

  // -- sections ------------------------------------------------------------------

  function renderLoop(health) {
    const sec = $("loop");
    const loop = health.loop || {};
    setText(sec, "alive", loop.alive ? "yes" : "no");
    setText(sec, "lag", seconds(loop.lag));
    setText(sec, "lag_p50", seconds(loop.lag_p50));
    setText(sec, "lag_p99", seconds(loop.lag_p99));
    const blocked = loop.blocked || { count: 0 };
    setText(sec, "blocked", `${blocked.count} time(s)`);
    const last = blocked.last;
    setText(sec, "last_blocked", last ? `${last.description} for ${seconds(last.duration)}, ${ago(last.at)}` : "–");
  }

  // The whole cluster (a durable backend): every node sharing the store.
  function renderNodes(cluster) {
    const section = $("nodes-section");
    section.hidden = !(cluster && cluster.shared);
    if (section.hidden) return;
    const dead = cluster.dead ? `, ${cluster.dead} dead (silent > ${seconds(cluster.dead_after)})` : "";
    $("nodes-summary").textContent = `${cluster.alive} alive${dead}`;
    syncRows($("nodes"), cluster.nodes, (n) => n.id, (n) => el("tr", { "data-node": n.id },
      el("td", {}, el("span", { "data-field": "id", class: "mono" }), " ",
        el("span", { "data-field": "here", class: "badge here" })),
      el("td", {}, el("span", { class: "badge", "data-field": "state" })),
      el("td", { "data-field": "last_seen" }),
      el("td", { "data-field": "lag" }),
      el("td", { "data-field": "running" }),
      el("td", { "data-field": "host", class: "mono" }),
      el("td", { "data-field": "pid", class: "mono" }),
      el("td", { "data-field": "started" }),
    ), (tr, n) => {
      tr.dataset.alive = String(n.alive);
      setText(tr, "id", n.id);
      const here = setText(tr, "here", n.here ? "this node" : "");
      here.hidden = !n.here;
      setStatus(tr.querySelector('[data-field="state"]'), n.alive ? "alive" : "dead");
      const seen = setText(tr, "last_seen", ago(n.last_seen));
      seen.dataset.value = String(n.last_seen);
      setText(tr, "lag", seconds(n.lag));
      setText(tr, "running", n.running);
      setText(tr, "host", n.host);
      setText(tr, "pid", n.pid);
      setText(tr, "started", ago(n.started_at));
    });
  }

  // Who runs a periodic job: its store lease's holder, or where it runs without one.
  function leaderText(p) {
    const l = p.leader;
    if (!l) {
      if (p.scope === "process") return "every process";
      return p.holds_lock ? "this process (host lock)" : "host lock, not held here";
    }
    if (l.held) return l.here ? "this node" : l.owner;
    if (l.owner) return `nobody (${l.owner}'s lease ran out)`;
    return l.epoch === null ? "nobody yet" : "nobody (released)";
  }

  function renderPeriodic(list) {
    syncRows($("periodic"), list, (p) => p.name, (p) => {
      const tr = el("tr", { "data-periodic": p.name },
        el("td", { "data-field": "name", class: "mono" }),
        el("td", { "data-field": "schedule" }),
        el("td", {}, el("span", { class: "badge", "data-field": "state" })),
        el("td", {}, el("span", { "data-field": "leader", class: "mono" }), " ",
          el("span", { "data-field": "leader_epoch", class: "muted" }), " ",
          el("span", { "data-field": "leader_expires", class: "muted" })),
        el("td", {}, el("span", { "data-field": "last_start", class: "mono" }), " ",
          el("span", { "data-field": "last_ago", class: "muted" })),
        el("td", { "data-field": "last_duration" }),
        el("td", {}, el("span", { "data-field": "next_due", class: "mono" }), " ",
          el("span", { "data-field": "next_in", class: "muted" })),
        el("td", { "data-field": "runs" }),
        el("td", { "data-field": "failures" }),
        el("td", { "data-field": "skips" }),
        el("td", { "data-field": "last_error", class: "error" }),
        el("td", { "data-field": "actions" }));
      if (canControl) {
        tr.querySelector('[data-field="actions"]').append(
          actionButton("Run now", "", () => post(`periodic/${encodeURIComponent(p.name)}/run`, `run ${p.name}`, () => "started")));
      }
      return tr;
    }, (tr, p) => {
      setText(tr, "name", p.name);
      setText(tr, "schedule", p.scope === "host" ? `${p.schedule} (one per host)` : p.schedule);
      setStatus(tr.querySelector('[data-field="state"]'), p.running ? "running" : "idle");
      const l = p.leader;
      const leader = setText(tr, "leader", leaderText(p));
      leader.dataset.owner = l && l.owner ? l.owner : "";
      leader.dataset.here = String(!!(l && l.here));
      leader.classList.toggle("here", !!(l && l.here));
      setText(tr, "leader_epoch", l && l.epoch !== null ? `epoch ${l.epoch}` : "");
      const expires = setText(tr, "leader_expires",
        l && l.held ? `until ${clock(l.expires_at)} (in ${seconds(Math.max(0, l.expires_at - now()))})` : "");
      expires.dataset.value = l && l.expires_at !== null ? String(l.expires_at) : "";
      const last = setText(tr, "last_start", clock(p.last_start));
      last.dataset.value = p.last_start === null ? "" : String(p.last_start);
      setText(tr, "last_ago", p.last_start ? `(${ago(p.last_start)})` : "");
      setText(tr, "last_duration", p.running ? "running" : seconds(p.last_duration));
      const due = setText(tr, "next_due", clock(p.next_due));
      due.dataset.value = p.next_due === null ? "" : String(p.next_due);
      setText(tr, "next_in", p.next_due ? `(in ${seconds(Math.max(0, p.next_due - now()))})` : "");
      setText(tr, "runs", p.runs);
      setText(tr, "failures", p.failures);
      setText(tr, "skips", p.skips);
      setText(tr, "last_error", p.last_error || "");
    });
  }

  function renderQueues(list) {
    syncRows($("queues"), list, (q) => q.name, (q) => {
      const tr = el("tr", { "data-queue": q.name },
        el("td", { "data-field": "name", class: "mono" }),
        el("td", { "data-field": "fill" }, bar(0)),
        el("td", { "data-field": "depth" }),
        el("td", { "data-field": "active" }),
        el("td", { "data-field": "processed" }),
        el("td", { "data-field": "failed" }),
        el("td", { "data-field": "last_error", class: "error" }));
      return tr;
    }, (tr, q) => {
      setText(tr, "name", q.name);
      tr.querySelector(".bar").setBar(q.capacity ? q.depth / q.capacity : 0);
      setText(tr, "depth", `${q.depth} / ${q.capacity}`);
      setText(tr, "active", `${q.active} / ${q.concurrency}`);
      setText(tr, "processed", q.processed);
      setText(tr, "failed", q.failed);
      setText(tr, "last_error", q.last_error || "");
    });
  }

  function renderRunning(jobs) {
    syncRows($("running"), jobs, (j) => j.id, (j) => {
      const progress = el("progress", { max: 1 });
      progress.setAttribute("value", "0");
      const tr = el("tr", { "data-job": j.id },
        el("td", { "data-field": "name", class: "mono" }),
        el("td", { "data-field": "id", class: "mono muted", title: j.id }),
        el("td", {}, el("span", { class: "badge", "data-field": "status" })),
        el("td", { "data-field": "duration" }),
        el("td", {}, progress, el("div", { "data-field": "progress_text", class: "progress-msg" })),
        el("td", { "data-field": "actions" }));
      if (canControl) {
        tr.querySelector('[data-field="actions"]').append(
          actionButton("Cancel", "danger", () => post(`jobs/${j.id}/cancel`, `cancel ${j.name} ${shortId(j.id)}`,
            (data) => (data.job ? data.job.status : "requested"))));
      }
      return tr;
    }, (tr, j) => {
      setText(tr, "name", j.name);
      setText(tr, "id", shortId(j.id));
      setStatus(tr.querySelector('[data-field="status"]'), j.status);
      setText(tr, "duration", seconds(j.duration));
      const progress = tr.querySelector("progress");
      const p = j.progress;
      if (p && p.fraction !== null) {
        progress.setAttribute("value", String(p.fraction));
      } else {
        progress.removeAttribute("value"); // indeterminate
      }
      let text = "";
      if (p) text = `${p.done}${p.total ? ` / ${p.total}` : ""}${p.message ? ` · ${p.message}` : ""}`;
      setText(tr, "progress_text", text);
    });
  }

  function renderFinished(tbodyId, jobs, withError) {
    syncRows($(tbodyId), jobs, (j) => j.id, (j) => el("tr", { "data-job": j.id },
      el("td", { "data-field": "name", class: "mono" }),
      el("td", { "data-field": "id", class: "mono muted", title: j.id }),
      el("td", {}, el("span", { class: "badge", "data-field": "status" })),
      el("td", { "data-field": "finished" }),
      withError ? el("td", { "data-field": "error", class: "error" }) : el("td", { "data-field": "took" }),
    ), (tr, j) => {
      setText(tr, "name", j.name);
      setText(tr, "id", shortId(j.id));
      setStatus(tr.querySelector('[data-field="status"]'), j.status);
      setText(tr, "finished", ago(j.finished_at));
      if (withError) setText(tr, "error", j.error || "");
      else setText(tr, "took", seconds(j.duration));
    });
  }

  // -- polling -----------------------------------------------------------------------

  async function getJSON(path) {
    const r = await fetch(base + path, { headers: { Accept: "application/json" }, cache: "no-store" });
    let data = null;
    try {
      data = await r.json();
    } catch (e) {
      data = null;
    }
    if (!data || (!r.ok && !(path === "health" && r.status === 503))) {
      throw new Error(`${path}: ${(data && data.error) || `HTTP ${r.status}`}`);
    }
    return data;
  }

  async function refresh() {
    try {
      const [health, live, failures, recent] = await Promise.all([
        getJSON("health"),
        getJSON("jobs?status=running,pending&limit=100"),
        getJSON("jobs?status=failed,timed_out&limit=10"),
        getJSON("jobs?status=succeeded,failed,cancelled,timed_out&limit=15"),
      ]);
      clockOffset = health.time - Date.now() / 1000;
      const status = $("status");
      setStatus(status, health.status);
      $("problems").textContent = (health.problems || []).join("; ");
      renderLoop(health);
      renderNodes(health.cluster);
      renderPeriodic(health.periodic || []);
      renderQueues(health.queues || []);
      renderRunning(live.jobs);
      renderFinished("failures", failures.jobs, true);
      renderFinished("recent", recent.jobs, false);
      $("updated").textContent = `updated ${clock(now())}`;
      $("conn-error").hidden = true;
    } catch (e) {
      const p = $("conn-error");
      p.textContent = `Cannot reach the app: ${e.message || e}`;
      p.hidden = false;
    }
  }

  function refreshSoon(delay) {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      await refresh();
      refreshSoon(refreshMs);
    }, delay);
  }

  refreshSoon(0);
})();
