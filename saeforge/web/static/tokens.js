// Tokens as the pages show them (mirrors saeforge/web/render.py): spaces at either end of a chip as a visible ␣,
// newlines and tabs as ↵ and ⇥, control tokens (<|im_start|>) as a dark chip with their name, and the replacement
// character that one byte of a multi-byte character decodes to as a marked �.
"use strict";
window.saeforgeTokens = (function () {
  const SPECIAL = /^(<\|[^<>|\s]{1,40}\|>|<\/?s>|<(bos|eos|pad|unk|mask|sep|cls)>|\[(BOS|EOS|PAD|UNK|CLS|SEP|MASK)\])$/i;
  const BAD_TITLE = "part of a multi-byte character: this token alone is not valid UTF-8";
  const show = (t) => (t ? t.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍")
    .replace(/[\x00-\x08\x0b\x0c\x0e-\x1f]/g, (c) => String.fromCharCode(0x2400 + c.charCodeAt(0))) : "∅");
  const controlName = (t) => (t && SPECIAL.test(t) ? t.replace(/^[<>|[\]/]+|[<>|[\]/]+$/g, "") || t : null);

  function span(cls, text, title) {
    const node = document.createElement("span");
    node.className = cls;
    if (text !== undefined) node.textContent = text;
    if (title) node.title = title;
    return node;
  }

  // the text of a token with replacement characters marked, appended to node
  function fill(node, t) {
    show(t).split("\ufffd").forEach((part, i) => {
      if (i) node.append(span("bad", "\ufffd", BAD_TITLE));
      if (part) node.append(part);
    });
    return node;
  }

  // a token inside running text: its content (the caller makes the span)
  function inline(node, t, special) {
    const name = controlName(t);
    if (special || name !== null) {
      node.append(span("ctl", name !== null ? name : show(t), `control token ${t}`));
      return node;
    }
    return fill(node, t);
  }

  // a token on its own, as a chip
  function chip(t, cls) {
    const node = span(("tok " + (cls || "")).trim());
    const name = controlName(t);
    if (name !== null) {
      node.classList.add("ctl");
      node.textContent = name;
      node.title = `control token ${t}`;
      return node;
    }
    node.title = JSON.stringify(t);
    if (!t) { node.textContent = "∅"; return node; }
    const core = t.replace(/^ +| +$/g, "");
    const lead = core ? t.length - t.replace(/^ +/, "").length : t.length;
    const trail = core ? t.length - t.replace(/ +$/, "").length : 0;
    for (let i = 0; i < lead; i++) node.append(span("ws", "␣", "a space"));
    if (core) fill(node, core);
    for (let i = 0; i < trail; i++) node.append(span("ws", "␣", "a space"));
    return node;
  }

  return { show, chip, inline, controlName };
})();
