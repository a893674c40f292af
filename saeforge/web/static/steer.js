// Steering playground: POST the prompts and feature edits to /api/steer, then show per prompt the baseline and the
// steered continuation side by side, and the measured effect (target activation, perplexity, KL). No framework.
"use strict";
(function () {
  const form = document.getElementById("steer-form");
  const prompts = document.getElementById("prompts");
  const rowsBox = document.getElementById("edit-rows");
  const rowTemplate = document.getElementById("edit-row-template");
  const addButton = document.getElementById("add-edit");
  const button = document.getElementById("steer-button");
  const errorBox = document.getElementById("steer-error");
  const result = document.getElementById("steer-result");
  const effectRows = document.querySelector("#effect-table tbody");
  const summary = document.getElementById("effect-summary");
  const outputs = document.getElementById("outputs");
  const maxEdits = Number(form.dataset.maxEdits);

  const el = (tag, attrs = {}, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const num = (v, digits = 4) => (v === null || v === undefined ? "–" : v === 0 ? "0" : Number(v).toPrecision(digits));
  const mean = (xs) => (xs.length && xs.every((x) => x !== null) ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
  const featureUrl = (sae, idx) => `/saes/${encodeURIComponent(sae)}/features/${idx}`;

  // ------------------------------------------------------------------------------------------- feature rows
  function wireRow(row) {
    const sae = row.querySelector(".edit-sae");
    const feature = row.querySelector(".edit-feature");
    const link = row.querySelector(".edit-link");
    const update = () => {
      const idx = feature.value.trim();
      const option = sae.selectedOptions[0];
      const d = option ? option.dataset.dSae : "";
      feature.title = d ? `0..${Number(d) - 1}` : "";
      link.hidden = !/^\d+$/.test(idx);
      if (!link.hidden) link.href = featureUrl(sae.value, idx);
    };
    sae.addEventListener("change", update);
    feature.addEventListener("input", update);
    row.querySelector(".remove-edit").addEventListener("click", () => {
      row.remove();
      updateButtons();
    });
    update();
  }

  function updateButtons() {
    addButton.disabled = rowsBox.children.length >= maxEdits;
  }

  addButton.addEventListener("click", () => {
    const row = rowTemplate.content.firstElementChild.cloneNode(true);
    rowsBox.append(row);
    wireRow(row);
    updateButtons();
    row.querySelector(".edit-feature").focus();
  });
  Array.from(rowsBox.children).forEach(wireRow);
  updateButtons();

  // ------------------------------------------------------------------------------------------- request
  function request() {
    const finite = (input) => {
      const v = input.valueAsNumber;
      return Number.isFinite(v) ? v : null; // the server names the allowed range
    };
    return {
      prompts: prompts.value.split("\n").map((p) => p.replace(/\r$/, "")).filter((p) => p.trim()),
      edits: Array.from(rowsBox.querySelectorAll(".edit-row")).map((row) => ({
        sae: row.querySelector(".edit-sae").value,
        feature: finite(row.querySelector(".edit-feature")),
        mode: row.querySelector(".edit-mode").value,
        strength: finite(row.querySelector(".edit-strength")),
        unit: row.querySelector(".edit-unit").value,
      })),
      positions: document.getElementById("positions").value,
      max_new_tokens: Number(document.getElementById("max-new-tokens").value),
      temperature: Number(document.getElementById("temperature").value),
      seed: Number(document.getElementById("seed").value),
    };
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    result.hidden = true;
  }

  // ------------------------------------------------------------------------------------------- result
  function describeFeature(cell, body, e) {
    cell.append(el("a", { href: featureUrl(e.sae, e.feature), class: "feature-link" }, `#${e.feature}`));
    cell.append(el("span", { class: "muted small" }, ` ${e.sae}`));
    const known = (body.feature_info[e.sae] || {})[e.feature];
    if (known && known.explanation) cell.append(el("div", { class: "small" }, known.explanation));
    else if (known && known.top_tokens && known.top_tokens.length) {
      const line = el("div", { class: "small" });
      line.append(el("span", { class: "muted" }, "fires most on "));
      for (const [t] of known.top_tokens.slice(0, 4)) line.append(window.saeforgeTokens.chip(t));
      cell.append(line);
    }
  }

  function render(body) {
    effectRows.replaceChildren();
    body.metrics.edits.forEach((m) => {
      const tr = el("tr", { "data-feature": String(m.feature), "data-sae": m.sae });
      const feat = el("td");
      describeFeature(feat, body, m);
      const value = m.activation_value === null || m.activation_value === undefined ? ""
        : ` (${num(m.activation_value, 3)} in activation units)`;
      const edit = el("td", {}, `${m.mode} ${m.strength}${m.mode === "scale" ? "×" : " " + m.unit}${value}`);
      const act = el("td", { class: "activation" });
      act.append(el("span", { class: "act-baseline" }, num(m.target_activation_baseline)), " → ",
                 el("span", { class: "act-steered" }, num(m.target_activation_steered)));
      const injected = el("td", { class: "act-injected muted" }, num(m.target_activation_injected));
      tr.append(feat, edit, act, injected);
      effectRows.append(tr);
    });
    const pb = mean(body.metrics.perplexity_baseline);
    const ps = mean(body.metrics.perplexity_steered);
    summary.replaceChildren(
      el("span", { class: "muted" }, "perplexity under the plain model (mean of the prompts): "),
      el("span", { id: "ppl-baseline" }, num(pb)), " baseline → ", el("span", { id: "ppl-steered" }, num(ps)),
      " steered · ", el("span", { class: "muted" }, "KL on the prompt: "), el("span", { id: "kl" }, num(body.metrics.kl_prompt)),
      el("span", { class: "muted" }, ` · positions ${body.positions}, ${body.max_new_tokens} new tokens, ` +
         `temperature ${body.temperature}, seed ${body.seed} · ${body.seconds.toFixed(1)} s`));

    outputs.replaceChildren();
    body.prompts.forEach((p, i) => {
      const card = el("section", { class: "card prompt-result", "data-i": String(i) });
      const head = el("h2");
      head.append(el("span", { class: "muted" }, `Prompt ${i + 1}: `), el("span", { class: "prompt-text" }, p));
      const cols = el("div", { class: "cols" });
      for (const [kind, text, ppl] of [["baseline", body.baseline[i], body.metrics.perplexity_baseline[i]],
                                         ["steered", body.steered[i], body.metrics.perplexity_steered[i]]]) {
        const col = el("div", { class: `column ${kind}` });
        const h = el("h3", {}, kind);
        h.append(el("span", { class: "muted ppl", title: "perplexity under the plain model" }, ` · perplexity ${num(ppl)}`));
        const pre = el("div", { class: "continuation" });
        pre.append(el("span", { class: "prompt-echo" }, p), el("span", { class: "generated" }, text));
        col.append(h, pre);
        cols.append(col);
      }
      card.append(head, cols);
      outputs.append(card);
    });
    result.hidden = false;
  }

  // ------------------------------------------------------------------------------------------- submit
  let busy = false;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (busy) return;
    busy = true;
    errorBox.hidden = true;
    button.disabled = true;
    const started = Date.now();
    const tick = () => { button.textContent = `Steering… ${Math.round((Date.now() - started) / 1000)} s`; };
    tick();
    const timer = setInterval(tick, 1000);
    try {
      const res = await fetch("/api/steer", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
      });
      const body = await res.json().catch(() => ({ error: `the server answered ${res.status}` }));
      if (!res.ok) {
        showError(body.error + (body.fix ? ` — ${body.fix}` : ""));
        return;
      }
      render(body);
    } catch (err) {
      showError(`the request failed: ${err}`);
    } finally {
      clearInterval(timer);
      busy = false;
      button.disabled = false;
      button.textContent = "Steer";
    }
  });
  prompts.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
})();
