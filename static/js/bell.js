/* The header's bell and its toasts. The bell (notifications/partials/bell.html) is
 * loaded and refreshed by htmx; when a refresh brings notifications newer than the ones
 * this page already had, each becomes a toast for a few seconds. The job page also
 * toasts when the job it watches ends (its live status turns final). */
(function () {
  "use strict";

  var latestSeen = null; // newest notification id this page knew about

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
          toast(li.getAttribute("data-text"), a ? a.getAttribute("href") : "");
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
    if (jobStatus === false && final) {
      var badge = document.getElementById("job-status-" + prog.getAttribute("data-job"));
      var title = document.querySelector("h1");
      toast((title ? title.textContent + ": " : "") + (badge ? badge.textContent : ""), "");
    }
    jobStatus = final;
  }

  document.addEventListener("htmx:afterSwap", function () {
    var bell = document.getElementById("bell");
    if (bell && bell.hasAttribute("data-latest")) onBell(bell);
  });
  document.addEventListener("htmx:wsAfterMessage", onJob);
  document.addEventListener("DOMContentLoaded", onJob);
})();
