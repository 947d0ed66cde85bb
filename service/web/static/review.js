// The review page's keyboard flow and live diff (the stack viewer's keys are in viewer.js).
//   a / Ctrl+Enter: approve (a dialog asks to confirm; Enter signs, Esc cancels)
//   r: reject (focus the reason; Enter sends)   e: edit the text (Esc: back to the images)
//   n / p: next / previous draft awaiting review   ?: show the keys
// Without scripts the page still works: the forms submit as they are, without the confirmation.
"use strict";

(function () {
  const form = document.getElementById("approve-form");
  const dialog = document.getElementById("confirm-dialog");
  const texts = Array.from(document.querySelectorAll("textarea[data-draft]"));
  let confirmed = false;

  function typing(target) {
    return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  // Word-level diff (longest common subsequence of words and spaces), as the server's report_diff.
  function tokens(text) { return text.match(/\s+|[^\s]+/g) || []; }
  function diff(before, after) {
    const a = tokens(before), b = tokens(after);
    const n = a.length, m = b.length;
    const lcs = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
      }
    }
    const out = [];
    let i = 0, j = 0;
    const push = (op, text) => {
      if (out.length && out[out.length - 1].op === op) out[out.length - 1].text += text;
      else out.push({ op, text });
    };
    while (i < n || j < m) {
      if (i < n && j < m && a[i] === b[j]) { push("same", a[i]); i++; j++; }
      else if (j < m && (i === n || lcs[i][j + 1] >= lcs[i + 1][j])) { push("added", b[j]); j++; }
      else { push("removed", a[i]); i++; }
    }
    return out;
  }

  function changedCount() {
    return texts.filter((t) => t.value.trim() !== t.dataset.draft.trim()).length;
  }

  function showDiff(textarea) {
    let box = textarea.closest("label").nextElementSibling;
    if (!box || !box.classList.contains("live-diff")) return;
    box.replaceChildren();
    if (textarea.value.trim() === textarea.dataset.draft.trim()) {
      box.textContent = "Unchanged from the draft.";
      box.classList.add("muted");
      return;
    }
    box.classList.remove("muted");
    for (const piece of diff(textarea.dataset.draft, textarea.value)) {
      const node = piece.op === "same" ? document.createTextNode(piece.text) : document.createElement(piece.op === "added" ? "ins" : "del");
      if (piece.op !== "same") node.textContent = piece.text;
      box.appendChild(node);
    }
  }

  for (const textarea of texts) {
    if (textarea.readOnly) continue;
    textarea.addEventListener("input", () => showDiff(textarea));
    showDiff(textarea);
  }

  function askToApprove() {
    if (!form || !dialog) return;
    const n = changedCount();
    document.getElementById("confirm-changes").textContent = n
      ? `You changed ${n} of ${texts.length} texts of the draft (shown under each text).`
      : "You approve the draft as it is, unchanged.";
    dialog.showModal();
    document.getElementById("confirm-approve").focus();
  }

  if (form && dialog) {
    form.addEventListener("submit", (event) => {
      if (confirmed) return;
      event.preventDefault();
      askToApprove();
    });
    document.getElementById("confirm-approve").addEventListener("click", () => {
      confirmed = true;
      dialog.close();
      form.requestSubmit();
    });
    document.getElementById("cancel-approve").addEventListener("click", () => dialog.close());
  }

  function go(id) {
    const link = document.getElementById(id);
    if (link) window.location.assign(link.href);
  }

  document.addEventListener("keydown", (event) => {
    if (dialog && dialog.open) return; // the dialog's own buttons: Enter signs, Esc cancels
    if (typing(event.target)) {
      if (event.key === "Escape") {
        event.target.blur();
        const stack = window.MedCapStacks && window.MedCapStacks.active();
        if (stack) stack.root.focus();
      } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.tagName === "TEXTAREA" && form && dialog) {
        event.preventDefault();
        askToApprove();
      }
      return;
    }
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const actions = {
      a: askToApprove,
      r: () => { const reason = document.getElementById("reject-reason"); if (reason) { reason.scrollIntoView({ block: "center" }); reason.focus(); } },
      e: () => { const first = texts.find((t) => !t.readOnly); if (first) { first.focus(); first.setSelectionRange(first.value.length, first.value.length); } },
      n: () => go("next-draft"),
      p: () => go("previous-draft"),
      "?": () => { const keys = document.getElementById("keys"); keys.open = !keys.open; },
    };
    const action = actions[event.key];
    if (action) {
      event.preventDefault();
      action();
    }
  });
})();
