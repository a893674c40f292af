// Plots open full size: a click on a plot shows it at its natural size in a dialog (scrollable when larger than the
// window); a click anywhere or Escape closes it. Without JavaScript the link opens the PNG itself.
"use strict";
(function () {
  const dialog = document.getElementById("lightbox");
  if (!dialog) return;
  const img = dialog.querySelector("img");
  const caption = dialog.querySelector(".caption");
  document.querySelectorAll("a.plot-link").forEach((link) => {
    link.addEventListener("click", (ev) => {
      ev.preventDefault();
      img.src = link.href;
      img.alt = link.dataset.name || "";
      caption.textContent = link.dataset.name || "";
      dialog.showModal();
    });
  });
  dialog.addEventListener("click", () => dialog.close());
})();
