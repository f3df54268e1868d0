/* imagepub console: live updates for the jobs list and a job's page.
 *
 * No framework and no build step. Every value that comes from a job is put into the page with
 * textContent (or as a property), never parsed as HTML: a tag, a message or a log line that
 * holds markup shows as text. The session cookie authenticates every request (same origin).
 */
"use strict";

(function () {
  var TERMINAL = { succeeded: true, failed: true, cancelled: true };
  var DONE_LAYERS = { pushed: true, exists: true, mounted: true, pulled: true, copied: true, skipped: true };
  var LIST_EVERY_MS = 3000;
  var POLL_JOB_EVERY_MS = 2000;

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function when(iso) {
    var node = el("time");
    if (!iso) { node.textContent = "–"; return node; }
    node.dateTime = iso;
    node.textContent = iso.slice(0, 19).replace("T", " ") + " UTC";
    return node;
  }

  function stateBadge(state) {
    var node = el("span", "state state-" + state, state);
    node.setAttribute("data-state", "");
    return node;
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (resp) {
      if (resp.status === 401) { window.location.reload(); throw new Error("signed out"); }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      return resp.json();
    });
  }

  /* --- the jobs list: re-read the same page every few seconds, redraw rows that changed --- */

  function progressCell(row) {
    var td = el("td");
    if (row.state !== "running" && row.state !== "retrying" && row.percent === null) return td;
    var bar = el("progress");
    bar.setAttribute("aria-label", "progress of job …" + row.id.slice(-12));
    if (row.percent !== null) {
      bar.max = 100;
      bar.value = row.percent;
      td.appendChild(bar);
      td.appendChild(document.createTextNode(" "));
      td.appendChild(el("span", "pct", row.percent + " %"));
    } else {
      td.appendChild(bar);
    }
    return td;
  }

  function fillRow(tr, row) {
    while (tr.firstChild) tr.removeChild(tr.firstChild);
    var link = el("a", "job-id", "…" + row.id.slice(-12)); // a UUIDv7 begins with its time: the end tells jobs apart
    link.href = row.url;
    link.setAttribute("aria-label", "job " + row.id);
    var first = el("td");
    first.appendChild(link);
    var state = el("td");
    state.appendChild(stateBadge(row.state));
    if (row.error_code) { state.appendChild(document.createTextNode(" ")); state.appendChild(el("code", "code", row.error_code)); }
    if (row.waiting_for) { state.appendChild(document.createTextNode(" ")); state.appendChild(el("span", "waiting", row.waiting_for)); }
    var created = el("td");
    created.appendChild(when(row.created_at));
    created.className = "nowrap";
    [first, el("td", null, row.kind), state, el("td", "what", row.summary), el("td", "nowrap", row.client), created, progressCell(row)]
      .forEach(function (td) { tr.appendChild(td); });
    tr.setAttribute("data-id", row.id);
    tr.setAttribute("data-sig", JSON.stringify(row));
  }

  function followList(tbody) {
    var status = document.getElementById("list-status");
    function redraw(answer) {
      var existing = {};
      Array.prototype.forEach.call(tbody.querySelectorAll("tr[data-id]"), function (tr) { existing[tr.getAttribute("data-id")] = tr; });
      var changed = 0;
      var wanted = answer.rows.map(function (row) {
        var tr = existing[row.id];
        delete existing[row.id];
        if (!tr) { tr = el("tr"); changed += 1; }
        else if (tr.getAttribute("data-sig") !== JSON.stringify(row)) {
          var before = tr.querySelector("[data-state]");
          if (before && before.textContent !== row.state) changed += 1;
        } else { return tr; }
        fillRow(tr, row);
        return tr;
      });
      Object.keys(existing).forEach(function (id) { tbody.removeChild(existing[id]); });
      var empty = tbody.querySelector("tr.empty");
      if (wanted.length && empty) tbody.removeChild(empty);
      wanted.forEach(function (tr, i) {
        if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); // moves only what moved
      });
      if (changed && status) status.textContent = changed + (changed === 1 ? " job changed" : " jobs changed") + " at " + new Date().toLocaleTimeString();
    }
    function tick() {
      if (document.hidden) return;
      getJSON(tbody.getAttribute("data-rows-url")).then(redraw).catch(function () { /* next tick tries again */ });
    }
    window.setInterval(tick, LIST_EVERY_MS);
    document.addEventListener("visibilitychange", tick);
  }

  /* --- a job's page: its event stream (or, when every stream slot is taken, polling) --- */

  function layerFraction(layer) {
    if (DONE_LAYERS[layer.status]) return 1;
    if (layer.total) return Math.max(0, Math.min(1, (layer.current || 0) / layer.total));
    return null;
  }

  function size(bytes) {
    if (bytes >= 1048576) return (bytes / 1048576).toFixed(1) + " MiB";
    if (bytes >= 1024) return (bytes / 1024).toFixed(1) + " KiB";
    return bytes + " B";
  }

  function drawLayers(tbody, layers) {
    var template = document.getElementById("layer-row");
    layers.forEach(function (layer) {
      var tr = null;
      Array.prototype.forEach.call(tbody.querySelectorAll("tr[data-layer]"), function (row) {
        if (row.getAttribute("data-layer") === layer.id) tr = row;
      });
      if (!tr) {
        tr = template.content.firstElementChild.cloneNode(true);
        tr.setAttribute("data-layer", layer.id);
        tr.querySelector(".layer-id").textContent = layer.id.slice(0, 19);
        tbody.appendChild(tr);
      }
      tr.querySelector(".layer-status").textContent = layer.status;
      var bar = tr.querySelector("progress");
      bar.setAttribute("aria-label", "layer " + layer.id.slice(0, 12) + " progress");
      var fraction = layerFraction(layer);
      if (fraction === null) bar.removeAttribute("value");
      else bar.value = Math.floor(fraction * 1000);
      tr.querySelector(".layer-bytes").textContent = layer.total ? size(layer.current || 0) + " / " + size(layer.total) : "";
    });
  }

  function drawTargets(job) {
    (job.targets || []).forEach(function (target, i) {
      var section = document.querySelector('[data-target="' + i + '"]');
      if (!section) return;
      section.querySelector("[data-target-state]").textContent = target.state;
      section.querySelector("[data-target-digest]").textContent = target.digest || "–";
      var refs = section.querySelector("[data-target-references]");
      while (refs.firstChild) refs.removeChild(refs.firstChild);
      (target.references || []).forEach(function (ref) {
        var li = el("li");
        li.appendChild(el("code", null, ref));
        refs.appendChild(li);
      });
      drawLayers(section.querySelector("[data-layers]"), target.layers || []);
    });
    var result = document.querySelector("[data-result]");
    if (result && job.result) drawLayers(result.querySelector("[data-layers]"), job.result.layers || []);
  }

  function followJob(article) {
    var live = document.getElementById("job-live");
    var shown = article.querySelector("[data-state]").textContent;
    var source = null;
    var polling = null;

    function draw(job) {
      if (job.state !== shown) {
        var holder = document.getElementById("job-state");
        while (holder.firstChild) holder.removeChild(holder.firstChild);
        holder.appendChild(stateBadge(job.state));
        var item = el("li");
        item.appendChild(when(job.updated_at));
        item.appendChild(document.createTextNode(" — now " + job.state));
        document.getElementById("timeline").appendChild(item);
        live.textContent = "The job is " + job.state + ".";
        shown = job.state;
      }
      document.getElementById("job-attempts").textContent = job.attempts;
      drawTargets(job);
      if (TERMINAL[job.state]) {
        if (source) source.close();
        if (polling) window.clearInterval(polling);
        live.textContent = "The job " + job.state + ".";
        window.setTimeout(function () { window.location.reload(); }, 300); // the finished page: digests, error, advice
      }
    }

    function poll() {
      if (polling) return;
      live.textContent = "Following its progress (polling).";
      polling = window.setInterval(function () {
        getJSON(article.getAttribute("data-state-url")).then(draw).catch(function () {});
      }, POLL_JOB_EVERY_MS);
    }

    if (!window.EventSource) { poll(); return; }
    source = new EventSource(article.getAttribute("data-events-url"));
    var onEvent = function (event) { draw(JSON.parse(event.data)); };
    source.addEventListener("state", onEvent);
    source.addEventListener("progress", onEvent);
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) poll(); // refused (e.g. 503 too_many_streams): poll instead
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    var rows = document.getElementById("job-rows");
    if (rows && rows.getAttribute("data-rows-url")) followList(rows);
    var article = document.getElementById("job");
    if (article && article.getAttribute("data-events-url")) followJob(article);
  });
})();
