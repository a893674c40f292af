// Prompt inspector: POST the text to /api/inspect, then show each token shaded by its strongest feature;
// clicking a token lists its features (linked to their pages). No framework, no build step.
"use strict";
(function () {
  const saes = JSON.parse(document.currentScript.dataset.saes || "[]");
  const form = document.getElementById("inspect-form");
  const prompt = document.getElementById("prompt");
  const topInput = document.getElementById("top");
  const button = document.getElementById("inspect-button");
  const errorBox = document.getElementById("inspect-error");
  const result = document.getElementById("inspect-result");
  const tokensBox = document.getElementById("tokens");
  const detail = document.getElementById("token-detail");
  const saeSelect = document.getElementById("sae-select");
  const charCount = document.getElementById("char-count");
  const maxChars = Number(form.dataset.maxChars);
  let rows = [];
  let info = {};

  const el = (tag, attrs = {}, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const show = (t) => (t ? t.replace(/\n/g, "↵").replace(/\t/g, "⇥") : "∅");
  const currentSae = () => (saeSelect ? saeSelect.value : saes[0]);

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    result.hidden = true;
  }

  function render() {
    const sae = currentSae();
    const peak = Math.max(1e-9, ...rows.map((r) => ((r.features[sae] || [])[0] || [0, 0])[1]));
    tokensBox.replaceChildren();
    rows.forEach((r, i) => {
      const feats = r.features[sae] || [];
      const best = feats.length ? feats[0][1] : 0;
      const span = el("span", { class: "t" + (r.special ? " special" : "") + (best > 0 ? " on" : ""),
                                "data-i": String(i), tabindex: "0",
                                title: r.special ? "special token (not SAE data)" : `${feats.length} active` },
                      show(r.token));
      if (best > 0) span.style.background = `rgba(238, 108, 0, ${(0.15 + 0.85 * best / peak).toFixed(3)})`;
      span.addEventListener("click", () => select(i));
      span.addEventListener("keydown", (ev) => { if (ev.key === "Enter") select(i); });
      tokensBox.append(span);
    });
    const first = rows.findIndex((r) => (r.features[sae] || []).length);
    select(first >= 0 ? first : 0);
  }

  function select(i) {
    const sae = currentSae();
    const r = rows[i];
    tokensBox.querySelectorAll(".selected").forEach((n) => n.classList.remove("selected"));
    const span = tokensBox.querySelector(`[data-i="${i}"]`);
    if (span) span.classList.add("selected");
    detail.replaceChildren(el("h2", {}, `Token ${i}: `));
    detail.firstChild.append(el("span", { class: "tok" }, show(r.token)));
    const feats = r.features[sae] || [];
    if (!feats.length) {
      detail.append(el("p", { class: "muted" }, r.special ? "Special token: outside the SAE's data." : "No feature fires here."));
      return;
    }
    const table = el("table", { class: "metrics token-features" });
    const head = el("tr");
    head.append(el("th", {}, "feature"), el("th", {}, "activation"), el("th", {}, "explanation"));
    table.append(head);
    for (const [idx, act, expl] of feats) {
      const tr = el("tr", { "data-idx": String(idx) });
      const td = el("td");
      td.append(el("a", { href: `/saes/${encodeURIComponent(sae)}/features/${idx}`, class: "feature-link" }, `#${idx}`));
      const cell = el("td");
      const known = (info[sae] || {})[idx];
      if (expl) cell.textContent = expl;
      else if (known && known.top_tokens.length) {
        cell.append(el("span", { class: "muted" }, "fires most on "));
        for (const [t] of known.top_tokens.slice(0, 4)) cell.append(el("span", { class: "tok" }, show(t)));
      } else cell.append(el("span", { class: "muted" }, "not explained"));
      tr.append(td, el("td", {}, act.toPrecision(4)), cell);
      table.append(tr);
    }
    detail.append(table);
  }

  prompt.addEventListener("input", () => {
    const n = prompt.value.length;
    charCount.textContent = `${n.toLocaleString()} / ${maxChars.toLocaleString()} characters`;
    charCount.classList.toggle("error", n > maxChars);
  });
  if (saeSelect) saeSelect.addEventListener("change", () => rows.length && render());

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errorBox.hidden = true;
    button.disabled = true;
    button.textContent = "Inspecting…";
    try {
      const res = await fetch("/api/inspect", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: prompt.value, top: Number(topInput.value) || 5 }),
      });
      const body = await res.json().catch(() => ({ error: `the server answered ${res.status}` }));
      if (!res.ok) {
        showError(body.error + (body.fix ? ` — ${body.fix}` : ""));
        return;
      }
      rows = body.tokens;
      info = body.feature_info || {};
      result.hidden = false;
      render();
    } catch (err) {
      showError(`the request failed: ${err}`);
    } finally {
      button.disabled = false;
      button.textContent = "Inspect";
    }
  });
})();
