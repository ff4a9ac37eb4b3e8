// Behaviour shared by every page (no inline scripts: the Content-Security-Policy forbids them).
document.querySelectorAll("select[data-autosubmit]").forEach((el) => {
  el.addEventListener("change", () => el.form.submit());
});
document.querySelectorAll("[data-print]").forEach((el) => {
  el.addEventListener("click", () => window.print());
});
