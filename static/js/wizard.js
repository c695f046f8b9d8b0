/* The wizard's options step: show only the options of the chosen mode. Each option's
 * paragraph carries data-modes (from the options schema, migrations_app/options.py); a
 * fieldset whose options are all hidden is hidden too. Without JavaScript every option
 * shows, and the schema drops the ones the mode does not use. */
(function () {
  "use strict";

  function apply(form) {
    var checked = form.querySelector("input[name='mode']:checked");
    if (!checked) return;
    var mode = checked.value;
    form.querySelectorAll("[data-modes]").forEach(function (p) {
      var modes = (p.getAttribute("data-modes") || "").split(" ");
      p.hidden = modes.indexOf(mode) < 0;
    });
    form.querySelectorAll("fieldset").forEach(function (fs) {
      var options = fs.querySelectorAll("[data-modes]");
      if (!options.length) return;
      var shown = Array.prototype.some.call(options, function (p) {
        return !p.hidden;
      });
      fs.hidden = !shown;
    });
  }

  function init() {
    document.querySelectorAll("form[data-testid='wizard-options']").forEach(function (form) {
      apply(form);
      form.addEventListener("change", function (e) {
        if (e.target && e.target.name === "mode") apply(form);
      });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
