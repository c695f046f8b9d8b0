/* The header's bell and its toasts. The bell (notifications/partials/bell.html) arrives
 * through the WebSocket ws/notifications/ (base.html #bell-live; notifications/live.py
 * pushes it again whenever it changes); while that socket is down it is fetched over
 * HTTP at once and then every FALLBACK_MS. When a bell brings notifications newer than
 * the ones this page already had, each becomes a toast for a few seconds. The job page
 * also toasts when the job it watches ends (its live status turns final); the bell's
 * toast for that same job is then left out. */
(function () {
  "use strict";

  var latestSeen = null; // newest notification id this page knew about
  var FALLBACK_MS = 60000;
  var socketOpen = false;
  var toastedJob = null; // the job page already toasted this job's end
  var bellToasted = {}; // links the bell already toasted (the job page then stays quiet)

  function toast(text, href) {
    var box = document.getElementById("toasts");
    if (!box || !text) return;
    var el = document.createElement(href ? "a" : "div");
    el.className = "toast";
    el.setAttribute("role", "status");
    el.setAttribute("data-testid", "toast");
    if (href) el.href = href;
    el.textContent = text;
    box.appendChild(el);
    window.setTimeout(function () {
      el.remove();
    }, 8000);
  }

  function onBell(bell) {
    var latest = Number(bell.getAttribute("data-latest") || 0);
    if (latestSeen !== null && latest > latestSeen) {
      bell.querySelectorAll("li.unread[data-event]").forEach(function (li) {
        if (Number(li.getAttribute("data-event")) > latestSeen) {
          var a = li.querySelector("a");
          var href = a ? a.getAttribute("href") : "";
          var own = toastedJob && href === "/migrations/" + toastedJob + "/" && /kind-job-/.test(li.className);
          if (!own) toast(li.getAttribute("data-text"), href);
          bellToasted[href] = true;
        }
      });
    }
    if (latestSeen === null || latest > latestSeen) latestSeen = latest;
  }

  var jobStatus = null;
  function onJob() {
    var prog = document.querySelector(".job-progress[data-job]");
    if (!prog) return;
    var final = prog.getAttribute("data-final") === "1";
    var mine = bellToasted["/migrations/" + prog.getAttribute("data-job") + "/"];
    if (jobStatus === false && final && !mine) {
      var badge = document.getElementById("job-status-" + prog.getAttribute("data-job"));
      var title = document.querySelector("h1");
      toast((title ? title.textContent + ": " : "") + (badge ? badge.textContent : ""), "");
      toastedJob = prog.getAttribute("data-job");
    }
    jobStatus = final;
  }

  function checkBell() {
    var bell = document.getElementById("bell");
    if (bell && bell.hasAttribute("data-latest")) onBell(bell);
  }

  function refreshBell() {
    var bell = document.getElementById("bell");
    if (bell && window.htmx) window.htmx.trigger(bell, "bell-refresh");
  }

  function isBellSocket(evt) {
    return evt.target && evt.target.id === "bell-live";
  }

  document.addEventListener("htmx:afterSwap", checkBell);
  document.addEventListener("htmx:wsOpen", function (evt) {
    if (!isBellSocket(evt)) return;
    socketOpen = true;
    evt.target.setAttribute("data-state", "open");
  });
  document.addEventListener("htmx:wsClose", function (evt) {
    if (!isBellSocket(evt)) return;
    var was = socketOpen;
    socketOpen = false;
    evt.target.setAttribute("data-state", "closed");
    if (was || latestSeen === null) refreshBell(); // catch up now, then every FALLBACK_MS
  });
  window.setInterval(function () {
    if (!socketOpen) refreshBell();
  }, FALLBACK_MS);
  document.addEventListener("htmx:wsAfterMessage", function (evt) {
    onJob();
    if (isBellSocket(evt)) checkBell();
  });
  document.addEventListener("DOMContentLoaded", onJob);
})();
