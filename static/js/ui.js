// kvmweb page helpers: multi-select, confirmations, auto-submitting selects.
// Loaded by base.html on every page; no inline scripts anywhere (a Content-Security-Policy
// may forbid them). Event delegation on document, so rows swapped in by htmx just work.
(function () {
  "use strict";

  function boxes(name) {
    return Array.prototype.slice.call(document.querySelectorAll('input[data-select="' + name + '"]'));
  }

  function refresh(name) {
    var all = boxes(name);
    var picked = all.filter(function (b) { return b.checked; }).length;
    document.querySelectorAll('[data-selcount="' + name + '"]').forEach(function (el) { el.textContent = picked; });
    document.querySelectorAll('[data-selbar="' + name + '"]').forEach(function (el) { el.hidden = picked === 0; });
    document.querySelectorAll('input[data-select-all="' + name + '"]').forEach(function (el) {
      el.checked = all.length > 0 && picked === all.length;
      el.indeterminate = picked > 0 && picked < all.length;
    });
  }

  document.addEventListener("change", function (event) {
    var el = event.target;
    if (el.matches("input[data-select-all]")) {
      var name = el.getAttribute("data-select-all");
      boxes(name).forEach(function (b) { b.checked = el.checked; });
      refresh(name);
    } else if (el.matches("input[data-select]")) {
      refresh(el.getAttribute("data-select"));
    } else if (el.matches("select[data-autosubmit]")) {
      el.form.submit();
    }
  });

  document.addEventListener("click", function (event) {
    var el = event.target.closest("[data-select-clear]");
    if (el) {
      var name = el.getAttribute("data-select-clear");
      boxes(name).forEach(function (b) { b.checked = false; });
      refresh(name);
      return;
    }
    el = event.target.closest("[data-confirm]");
    var question = el && el.getAttribute("data-confirm").replace("%(name)s", el.getAttribute("data-name") || "");
    if (el && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  document.addEventListener("htmx:afterSwap", function () { refresh("vm"); });

  // Countdowns (a job's or a batch's window): <span data-countdown="EPOCH SECONDS">.
  function countdown() {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-countdown]").forEach(function (el) {
      var left = Math.max(0, Math.round(parseFloat(el.getAttribute("data-countdown")) - now));
      var h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      el.textContent = (h ? h + " h " : "") + (h || m ? (m < 10 && h ? "0" : "") + m + " min " : "") + (s < 10 ? "0" : "") + s + " s";
    });
  }
  window.setInterval(countdown, 1000);
})();
