// Feature list: a token search orders by relevance unless another order was picked by hand.
"use strict";
(function () {
  const token = document.getElementById("token");
  const order = document.getElementById("order");
  if (!token || !order) return;
  const relevance = order.querySelector('option[value="relevance"]');
  let automatic = order.value === "density" || order.value === "relevance";
  token.addEventListener("input", () => {
    relevance.disabled = !token.value;
    if (automatic) order.value = token.value ? "relevance" : "density";
  });
  order.addEventListener("change", () => { automatic = false; });
})();
