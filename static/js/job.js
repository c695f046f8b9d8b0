/* kvmweb live jobs: the job page's chart and the live job lists. No external libraries.
 *
 * The WebSocket itself is htmx's ws extension: every message is HTML whose top-level
 * elements replace the elements with the same id. This file adds:
 *  - the htmx extension "kvmweb-jobs": a row of a job the list does not show yet is
 *    inserted at the top when it is newer than every row shown (a new job), else dropped
 *    (an older job filtered or paged out of this list);
 *  - a small canvas chart of transfer rate and remaining data over time, fed by the
 *    samples element (#job-samples-N, the full history, sent on load and on reconnect)
 *    and by each live progress block (#job-progress-N, one point per update);
 *  - hiding the controls once the job is final, and a connection indicator.
 */
(function () {
  "use strict";

  // ------------------------------------------------------------------ live job lists
  htmx.defineExtension("kvmweb-jobs", {
    transformResponse: function (text, xhr, elt) {
      if (text.indexOf("data-job-row") < 0) return text;
      var tpl = document.createElement("template");
      tpl.innerHTML = text;
      var rows = Array.prototype.filter.call(tpl.content.children, function (node) {
        return node.hasAttribute("data-job-row");
      });
      rows.forEach(function (tr) {
        if (document.getElementById(tr.id)) return; // htmx swaps it in place
        tr.remove();
        var tbody = elt.querySelector("tbody[data-job-rows]");
        if (!tbody) return;
        var id = Number(tr.getAttribute("data-job-row"));
        var shown = tbody.querySelectorAll("tr[data-job-row]");
        for (var i = 0; i < shown.length; i++) {
          if (Number(shown[i].getAttribute("data-job-row")) >= id) return;
        }
        tr.removeAttribute("hx-swap-oob");
        tbody.insertBefore(tr, tbody.firstChild);
        var empty = tbody.querySelector(".job-rows-empty");
        if (empty) empty.remove();
        var limit = Number(tbody.getAttribute("data-limit") || 0);
        if (limit) {
          var all = tbody.querySelectorAll("tr[data-job-row]");
          for (var j = limit; j < all.length; j++) all[j].remove();
        }
        htmx.process(tr);
      });
      return tpl.innerHTML;
    },
  });

  // ------------------------------------------------------------------ chart
  var series = {}; // job id -> {points: [[t, rate, remaining]...], samplesEl: Element}

  function num(v) {
    var n = parseFloat(v);
    return isFinite(n) ? n : null;
  }

  function bytes(n, perSecond) {
    var units = ["B", "KB", "MB", "GB", "TB"];
    var i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i ? n.toFixed(n < 10 ? 1 : 0) : Math.round(n)) + " " + units[i] + (perSecond ? "/s" : "");
  }

  function update(jobId) {
    var s = series[jobId] || (series[jobId] = { points: [], samplesEl: null });
    var samplesEl = document.getElementById("job-samples-" + jobId);
    if (samplesEl && samplesEl !== s.samplesEl) {
      // A new history (page load or reconnect): it replaces what we had, keeping only
      // live points newer than its last sample.
      s.samplesEl = samplesEl;
      var history = [];
      try {
        history = JSON.parse(samplesEl.textContent || "[]");
      } catch (e) {
        history = [];
      }
      var lastT = history.length ? history[history.length - 1][0] : -1;
      s.points = history.concat(
        s.points.filter(function (p) {
          return p[0] > lastT;
        })
      );
    }
    var prog = document.getElementById("job-progress-" + jobId);
    if (prog) {
      var started = num(prog.dataset.started);
      var at = num(prog.dataset.at);
      if (started !== null && at !== null && at >= started) {
        var t = at - started;
        var last = s.points.length ? s.points[s.points.length - 1][0] : -1;
        if (t > last + 1e-6) {
          s.points.push([t, num(prog.dataset.rate) || 0, num(prog.dataset.remaining) || 0]);
        }
      }
      // The controls follow the state and the phase (a cold move's shutdown wait offers
      // "Force off now"; a failed job offers "Try again").
      var status = prog.dataset.status + "/" + (prog.dataset.phase || "");
      if (s.status && s.status !== status) refreshControls();
      s.status = status;
      if (prog.dataset.final === "1") {
        document.querySelectorAll("[data-live-controls]:not([data-keep])").forEach(function (el) {
          el.hidden = true;
        });
      }
    }
    draw(jobId);
  }

  // The controls depend on the state (queued: cancel only; running: bandwidth, downtime,
  // post-copy) and on the user's permissions and CSRF token, so they are not part of the
  // shared live fragment: on a state change this browser fetches its own copy (a few
  // requests per job, not per progress update).
  function refreshControls() {
    var el = document.querySelector("[data-live-controls]");
    if (!el) return;
    htmx.ajax("GET", window.location.pathname, { target: el, select: "[data-live-controls]", swap: "outerHTML" });
  }

  // The cold move's shutdown countdown: the deadline is stored on the job, so every
  // watcher and a reload count down to the same instant; this ticks it every second.
  function tickCountdowns() {
    document.querySelectorAll(".countdown[data-deadline]").forEach(function (el) {
      var deadline = num(el.getAttribute("data-deadline"));
      if (deadline === null) return;
      var left = Math.max(0, Math.round(deadline - Date.now() / 1000));
      el.textContent = left + " s";
    });
  }

  // The chart's marks, [[t, label]]: those of the stored samples (page load, reconnect),
  // then the event-log lines that changed the downtime or the ladder's course
  // (data-chart-mark, swapped in live) whose label the samples do not have yet: a page
  // open while the ladder steps sees the step at once, not only after a reload. A label
  // is unique per job (the ladder's downtimes only go up), so it is the key.
  function chartMarks(jobId, pts) {
    var marks = [], seen = {};
    pts.forEach(function (p) {
      if (typeof p[3] === "string" && p[3] && !seen[p[3]]) {
        seen[p[3]] = true;
        marks.push([p[0], p[3]]);
      }
    });
    var prog = document.getElementById("job-progress-" + jobId);
    var started = prog ? num(prog.dataset.started) : null;
    if (started === null) return marks;
    document.querySelectorAll("#job-events-" + jobId + " li[data-chart-mark]").forEach(function (li) {
      var label = li.getAttribute("data-chart-mark");
      var at = num(li.getAttribute("data-at"));
      if (!label || seen[label] || at === null || at < started) return;
      seen[label] = true;
      marks.push([at - started, label]);
    });
    return marks;
  }

  function draw(jobId) {
    var canvas = document.getElementById("job-chart-" + jobId);
    if (!canvas || !canvas.getContext) return;
    var pts = series[jobId] ? series[jobId].points : [];
    var dpr = window.devicePixelRatio || 1;
    var w = canvas.clientWidth || 600;
    var h = canvas.clientHeight || 180;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var left = 70, right = 70, top = 10, bottom = 22;
    var pw = Math.max(10, w - left - right), ph = Math.max(10, h - top - bottom);
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#dde1e6";
    ctx.fillStyle = "#66707a";
    ctx.lineWidth = 1;
    ctx.strokeRect(left + 0.5, top + 0.5, pw, ph);
    if (!pts.length) {
      ctx.fillText("…", left + pw / 2, top + ph / 2);
      return;
    }
    var maxT = Math.max(1, pts[pts.length - 1][0]);
    var maxRate = 1, maxRem = 1;
    pts.forEach(function (p) {
      if (p[1] > maxRate) maxRate = p[1];
      if (p[2] > maxRem) maxRem = p[2];
    });
    maxRate *= 1.1;
    maxRem *= 1.1;
    for (var g = 0; g <= 4; g++) {
      var y = top + ph - (ph * g) / 4;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(left + pw, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillStyle = "#1f5fa8";
      ctx.textAlign = "right";
      ctx.fillText(bytes((maxRate * g) / 4, true), left - 4, y + 4);
      ctx.fillStyle = "#c25e00";
      ctx.textAlign = "left";
      ctx.fillText(bytes((maxRem * g) / 4, false), left + pw + 4, y + 4);
    }
    ctx.fillStyle = "#66707a";
    ctx.textAlign = "center";
    ctx.fillText("0 s", left, top + ph + 15);
    ctx.fillText(maxT.toFixed(maxT < 10 ? 1 : 0) + " s", left + pw, top + ph + 15);
    function line(index, max, color) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach(function (p, i) {
        var x = left + (pw * p[0]) / maxT;
        var y = top + ph - (ph * p[index]) / max;
        if (i) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
      });
      ctx.stroke();
    }
    line(1, maxRate, "#1f5fa8");
    line(2, maxRem, "#c25e00");
    // Convergence-ladder steps (a sample's 4th field: "600 ms", "postcopy", "abort"):
    // a dashed vertical line with its label.
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = "#7a3fb0";
    ctx.fillStyle = "#7a3fb0";
    ctx.lineWidth = 1;
    ctx.textAlign = "left";
    chartMarks(jobId, pts).forEach(function (m) {
      var x = Math.round(left + (pw * Math.min(m[0], maxT)) / maxT) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + ph);
      ctx.stroke();
      ctx.fillText(m[1], x + 3, top + 12);
    });
    ctx.setLineDash([]);
  }

  function updateAll() {
    document.querySelectorAll("canvas[id^='job-chart-']").forEach(function (c) {
      update(c.getAttribute("data-job"));
    });
  }

  // A collapsing log line (one per job, e.g. the memory pass counter) arrives as a new
  // line; drop the older copies so the log keeps one line however many passes run.
  function collapseEvents() {
    document.querySelectorAll("ol[id^='job-events-']").forEach(function (ol) {
      var seen = {};
      var items = ol.querySelectorAll("li[data-collapse]");
      for (var i = items.length - 1; i >= 0; i--) {
        var key = items[i].getAttribute("data-collapse");
        if (seen[key]) items[i].remove();
        seen[key] = true;
      }
    });
  }

  function connection(evt, state) {
    var el = document.getElementById("job-connection");
    if (!el || (evt.target && evt.target.id === "bell-live")) return; // the header's bell socket
    el.textContent = el.getAttribute("data-" + state) || "";
    el.setAttribute("data-state", state);
  }

  document.addEventListener("DOMContentLoaded", updateAll);
  document.body && updateAll();
  document.addEventListener("htmx:wsAfterMessage", updateAll);
  document.addEventListener("htmx:wsAfterMessage", collapseEvents);
  document.addEventListener("htmx:wsOpen", function (e) {
    connection(e, "open");
  });
  document.addEventListener("htmx:wsClose", function (e) {
    connection(e, "closed");
  });
  window.addEventListener("resize", updateAll);
  document.addEventListener("htmx:wsAfterMessage", tickCountdowns);
  document.addEventListener("DOMContentLoaded", tickCountdowns);
  window.setInterval(tickCountdowns, 1000);
})();
