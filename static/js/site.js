/* kvmweb page behaviour without inline script (the Content-Security-Policy forbids
 * inline <script> and on*= attributes; see kvmweb/security.py):
 *  - data-autosubmit on a form field: submit its form when the value changes;
 *  - data-confirm="question" on a form: ask before submitting;
 *  - data-select-all="name" on a checkbox: tick or untick every input[name=name].
 */
(function () {
  "use strict";
  document.addEventListener("change", function (event) {
    var field = event.target;
    if (field.hasAttribute && field.hasAttribute("data-autosubmit") && field.form) {
      field.form.submit();
    }
    var name = field.getAttribute && field.getAttribute("data-select-all");
    if (name) {
      document.querySelectorAll("input[name='" + name + "']").forEach(function (box) {
        box.checked = field.checked;
      });
    }
  });
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
