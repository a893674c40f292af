// Prompt inspector: POST the text to /api/inspect, then show each token shaded by its strongest feature; clicking a
// token lists its features (linked to their pages), and "across the prompt" on a feature shades every token by that
// one feature's activation (POST /api/inspect/feature). No framework, no build step.
"use strict";
(function () {
  const T = window.saeforgeTokens;
  const saes = JSON.parse(document.currentScript.dataset.saes || "[]");
  const form = document.getElementById("inspect-form");
  const prompt = document.getElementById("prompt");
  const topInput = document.getElementById("top");
  const button = document.getElementById("inspect-button");
  const errorBox = document.getElementById("inspect-error");
  const result = document.getElementById("inspect-result");
  const tokensBox = document.getElementById("tokens");
  const detail = document.getElementById("token-detail");
  const heatBar = document.getElementById("heat-legend");
  const saeSelect = document.getElementById("sae-select");
  const charCount = document.getElementById("char-count");
  const maxChars = Number(form.dataset.maxChars);
  let rows = [];
  let info = {};
  let text = "";
  let heat = null; // {sae, feature, acts, max_act} while one feature is shown across the prompt
  let selected = 0;

  const el = (tag, attrs = {}, content) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (content !== undefined) node.textContent = content;
    return node;
  };
  const currentSae = () => (saeSelect ? saeSelect.value : saes[0]);
  const featureUrl = (sae, idx) => `/saes/${encodeURIComponent(sae)}/features/${idx}`;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    result.hidden = true;
  }

  async function post(url, body) {
    const res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                   body: JSON.stringify(body) });
    const data = await res.json().catch(() => ({ error: `the server answered ${res.status}` }));
    if (!res.ok) throw new Error(data.error + (data.fix ? ` — ${data.fix}` : ""));
    return data;
  }

  // shade every token: by its strongest feature of the chosen SAE, or by the one feature shown across the prompt
  function render() {
    const sae = currentSae();
    const strongest = rows.map((r) => ((r.features[sae] || [])[0] || [0, 0])[1]);
    const values = heat ? heat.acts : strongest;
    const scale = heat ? Math.max(1e-9, heat.max_act, heat.harvested_max_act || 0) : Math.max(1e-9, ...strongest);
    const color = heat ? "37, 99, 235" : "238, 108, 0";
    tokensBox.replaceChildren();
    tokensBox.classList.toggle("heat", !!heat);
    rows.forEach((r, i) => {
      const v = values[i] || 0;
      const span = el("span", { class: "t" + (r.special ? " special" : "") + (v > 0 ? " on" : ""),
                                "data-i": String(i), "data-act": String(v), tabindex: "0",
                                title: r.special ? "control token (not SAE data)"
                                  : heat ? `#${heat.feature}: ${v.toPrecision(4)}`
                                    : `${(r.features[sae] || []).length} active` });
      T.inline(span, r.token, r.special);
      if (v > 0) span.style.background = `rgba(${color}, ${(0.15 + 0.85 * Math.min(1, v / scale)).toFixed(3)})`;
      span.addEventListener("click", () => select(i));
      span.addEventListener("keydown", (ev) => { if (ev.key === "Enter") select(i); });
      tokensBox.append(span);
    });
    heatBar.replaceChildren();
    heatBar.hidden = !heat;
    if (heat) {
      const n = heat.acts.filter((a) => a > 0).length;
      heatBar.append(el("span", {}, "Shading: feature "),
                     el("a", { href: featureUrl(heat.sae, heat.feature), class: "feature-link" }, `#${heat.feature}`),
                     el("span", { class: "muted" }, ` across the prompt: fires on ${n} of ${heat.acts.length} tokens, ` +
                        `up to ${Math.max(0, ...heat.acts).toPrecision(4)}` +
                        (heat.harvested_max_act ? ` (its largest on the harvested text: ${heat.harvested_max_act.toPrecision(4)})` : "") + " "));
      const clear = el("button", { type: "button", class: "secondary", id: "heat-clear" }, "show strongest features");
      clear.addEventListener("click", () => { heat = null; render(); });
      heatBar.append(clear);
    }
    select(Math.min(selected, rows.length - 1));
  }

  async function across(sae, idx, trigger) {
    trigger.disabled = true;
    try {
      heat = await post("/api/inspect/feature", { text, sae, feature: idx });
      errorBox.hidden = true;
      render();
    } catch (err) {
      errorBox.textContent = String(err.message || err);
      errorBox.hidden = false;
    } finally {
      trigger.disabled = false;
    }
  }

  function select(i) {
    selected = i;
    const sae = currentSae();
    const r = rows[i];
    tokensBox.querySelectorAll(".selected").forEach((n) => n.classList.remove("selected"));
    const span = tokensBox.querySelector(`[data-i="${i}"]`);
    if (span) span.classList.add("selected");
    const head = el("h2", {}, `Token ${i}: `);
    head.append(T.chip(r.token));
    detail.replaceChildren(head);
    const feats = r.features[sae] || [];
    if (!feats.length) {
      detail.append(el("p", { class: "muted" }, r.special ? "Control token: outside the SAE's data." : "No feature fires here."));
      return;
    }
    const table = el("table", { class: "metrics token-features" });
    const headRow = el("tr");
    headRow.append(el("th", {}, "feature"), el("th", {}, "activation"), el("th", {}, "explanation"), el("th"));
    table.append(headRow);
    for (const [idx, act, expl] of feats) {
      const tr = el("tr", { "data-idx": String(idx) });
      const td = el("td");
      td.append(el("a", { href: featureUrl(sae, idx), class: "feature-link" }, `#${idx}`));
      const cell = el("td");
      const known = (info[sae] || {})[idx];
      if (expl) cell.textContent = expl;
      else if (known && known.top_tokens.length) {
        cell.append(el("span", { class: "muted" }, "fires most on "));
        for (const [t] of known.top_tokens.slice(0, 4)) cell.append(T.chip(t));
      } else cell.append(el("span", { class: "muted" }, "not explained"));
      const action = el("td");
      const heatButton = el("button", { type: "button", class: "secondary small heat-button",
                                        title: "shade every token of the prompt by this feature" }, "across the prompt");
      heatButton.addEventListener("click", () => across(sae, idx, heatButton));
      action.append(heatButton);
      tr.append(td, el("td", {}, act.toPrecision(4)), cell, action);
      table.append(tr);
    }
    detail.append(table);
  }

  prompt.addEventListener("input", () => {
    const n = prompt.value.length;
    charCount.textContent = `${n.toLocaleString()} / ${maxChars.toLocaleString()} characters`;
    charCount.classList.toggle("error", n > maxChars);
  });
  if (saeSelect) saeSelect.addEventListener("change", () => { heat = null; if (rows.length) render(); });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errorBox.hidden = true;
    button.disabled = true;
    button.textContent = "Inspecting…";
    try {
      const body = await post("/api/inspect", { text: prompt.value, top: Number(topInput.value) || 5 });
      rows = body.tokens;
      info = body.feature_info || {};
      text = body.text;
      heat = null;
      const sae = currentSae();
      const first = rows.findIndex((r) => (r.features[sae] || []).length);
      selected = first >= 0 ? first : 0;
      result.hidden = false;
      render();
    } catch (err) {
      showError(String(err.message || err));
    } finally {
      button.disabled = false;
      button.textContent = "Inspect";
    }
  });
})();
