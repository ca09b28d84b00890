// tuneship pages: the write actions of each page, through the /v1 API. Where a key is set the page was opened
// after signing in: the browser sends the HttpOnly session cookie (and its Origin) with every call by itself.
"use strict";

function notice(text, isError) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// Calls the /v1 API with the session cookie; an ended session or a refusal is said in words, not thrown at the person.
async function api(method, url, body, extraHeaders) {
  const headers = Object.assign({ "Content-Type": "application/json" }, extraHeaders);
  const response = await fetch(url, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
  if (response.status === 401) {
    throw new Error("Your sign-in has ended (signed out, expired, or the server restarted): reload the page and sign in again.");
  }
  if (response.status === 403) {
    const reason = data && data.error && data.error.message;
    throw new Error("The server refused this change (403)" + (reason ? ": " + reason : "."));
  }
  if (!response.ok) {
    const detail = data && (data.detail || (data.error && data.error.message) || data.error);
    throw new Error(method + " " + url + " failed (" + response.status + "): " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
  }
  return data;
}

// Runs an action and reports its outcome in the page's live region.
async function act(action, done) {
  try {
    const result = await action();
    if (done) notice(done, false);
    return result;
  } catch (error) {
    notice(error.message, true);
    return null;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const init of window.tuneshipPages || []) init();
});

window.tuneship = { api, act, notice };

// A button that shows a one-textarea form (and focuses it); submitting the form hands its text to `send`.
function disclosure(button, form, send) {
  button.addEventListener("click", () => {
    form.hidden = !form.hidden;
    button.setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) form.querySelector("textarea").focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send(form.querySelector("textarea").value);
  });
}

function newKey() { return (crypto.randomUUID && crypto.randomUUID()) || String(Date.now()) + Math.random(); }

// Playground: chat through /v1/chat/completions; rate or correct each answer through /v1/feedback.
window.tuneshipPlayground = function () {
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const conversation = document.getElementById("conversation");
  let history = [];

  function addTurn(role, text) {
    const turn = document.createElement("div");
    turn.className = "turn " + role;
    turn.innerHTML = '<div class="who"></div><div class="text"></div>';
    turn.querySelector(".who").textContent = role === "user" ? "You" : role;
    turn.querySelector(".text").textContent = text;
    conversation.appendChild(turn);
    return turn;
  }

  // A rating's Idempotency-Key is the answer and the rating: a double click counts once.
  function sendFeedback(generationId, body, state) {
    const key = body.rating ? generationId + ":" + body.rating : newKey();
    return act(async () => {
      await api("POST", "/v1/feedback", Object.assign({ generation_id: generationId }, body), { "Idempotency-Key": key });
      state.textContent = body.correction ? "correction sent" : "thanks: rated " + body.rating;
    });
  }

  function addAnswer(reply) {
    const node = document.getElementById("answer-template").content.firstElementChild.cloneNode(true);
    const generationId = reply.id;
    node.dataset.generation = generationId;
    node.querySelector(".who").textContent = reply.model + (reply.tuneship && reply.tuneship.version ? " (v" + reply.tuneship.version + ")" : "");
    const text = reply.choices[0].message.content;
    node.querySelector(".text").textContent = text.trim() ? text : "(blank: only white space, " + text.length + " characters)";
    if (!text.trim()) node.querySelector(".text").className = "text blank";
    const state = node.querySelector(".feedback-state");
    const correction = node.querySelector("form.correction");
    const opener = node.querySelector(".correct-open");
    node.querySelector(".rate-up").addEventListener("click", () => sendFeedback(generationId, { rating: "up" }, state));
    node.querySelector(".rate-down").addEventListener("click", () => sendFeedback(generationId, { rating: "down" }, state));
    disclosure(opener, correction, (text) =>
      sendFeedback(generationId, { correction: text }, state).then(() => { if (state.textContent) correction.hidden = true; }));
    conversation.appendChild(node);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    const model = document.getElementById("chat-model").value;
    const messages = history.concat([{ role: "user", content: text }]);
    addTurn("user", text);
    input.value = "";
    notice("asking " + model + " ...", false);
    const reply = await act(() => api("POST", "/v1/chat/completions", { model, messages }));
    if (!reply) return;
    notice("", false);
    history = messages.concat([{ role: "assistant", content: reply.choices[0].message.content }]);
    addAnswer(reply);
  });
  document.getElementById("chat-reset").addEventListener("click", () => {
    history = [];
    conversation.textContent = "";
    input.focus();
  });
};

// Review: approve / edit / reject one item, or the selected ones in bulk, through /v1/review.
window.tuneshipReview = function () {
  function decide(ids, action) {
    return act(async () => {
      const result = await api("POST", "/v1/review", { generation_ids: ids, action });
      for (const id of ids) {
        const item = document.querySelector('.review-item[data-generation="' + CSS.escape(id) + '"]');
        if (item) item.remove();
      }
      return result;
    }, ids.length + " item(s) " + (action === "approve" ? "approved" : "rejected"));
  }
  for (const item of document.querySelectorAll(".review-item")) {
    const id = item.dataset.generation;
    const editForm = item.querySelector(".edit-form");
    const editButton = item.querySelector('[data-action="edit"]');
    item.querySelector('[data-action="approve"]').addEventListener("click", () => decide([id], "approve"));
    item.querySelector('[data-action="reject"]').addEventListener("click", () => decide([id], "reject"));
    disclosure(editButton, editForm, (correction) => act(async () => {
      await api("POST", "/v1/review/" + encodeURIComponent(id) + "/edit", { correction });
      item.remove();
    }, "edited and approved"));
  }
  const all = document.getElementById("review-select-all");
  if (!all) return;
  all.addEventListener("change", () => {
    for (const box of document.querySelectorAll(".review-select")) box.checked = all.checked;
  });
  for (const button of document.querySelectorAll("[data-bulk]")) {
    button.addEventListener("click", () => {
      const ids = Array.from(document.querySelectorAll(".review-select:checked")).map((b) => b.value);
      if (!ids.length) { notice("Select at least one item first.", true); return; }
      decide(ids, button.dataset.bulk);
    });
  }
};

// Versions: promote a version or roll back, each after a confirmation.
window.tuneshipVersions = function () {
  function confirmed(button, question, url, done) {
    button.addEventListener("click", async () => {
      if (!window.confirm(question)) return;
      if (await act(() => api("POST", url), done)) window.location.reload();
    });
  }
  for (const button of document.querySelectorAll("button.promote")) {
    const id = button.dataset.version;
    confirmed(button, "Promote v" + id + " to champion? It serves every request from now on.",
      "/v1/versions/" + id + "/promote", "v" + id + " is the champion");
  }
  const rollback = document.getElementById("rollback");
  if (rollback) {
    confirmed(rollback, "Roll back to v" + rollback.dataset.to + "? The current champion is marked rejected.",
      "/v1/rollback", "rolled back");
  }
};

// Loop: poll /v1/loop/status and keep the counts and the running cycle's stage live.
window.tuneshipLoop = function () {
  const section = document.getElementById("loop-status");
  const stages = document.getElementById("cycle").dataset.stages.split(",");
  const set = (id, text) => { document.getElementById(id).textContent = text; };

  function show(status) {
    set("waiting", status.examples_waiting);
    set("threshold", status.threshold);
    set("pending-review", status.examples_pending_review);
    set("trigger", status.trigger.reason);
    set("champion", status.champion ? "v" + status.champion.id + " " + status.champion.name : "none");
    const bar = document.getElementById("waiting-progress");
    bar.max = status.threshold;
    bar.value = Math.min(status.examples_waiting, status.threshold);
    const running = status.cycle_running;
    const cycle = document.getElementById("cycle");
    cycle.textContent = "";
    const stage = document.createElement(running ? "strong" : "span");
    stage.id = "cycle-stage";
    stage.textContent = running ? running.stage : "no cycle running";
    if (running) cycle.append("running: stage ", stage, running.version ? " (v" + running.version + ")" : "");
    else cycle.append(stage);
    const progress = document.getElementById("cycle-progress");
    progress.max = stages.length;
    progress.value = running ? stages.indexOf(running.stage) + 1 : 0;
    const last = status.last_cycle;
    set("last-cycle", last ? last.kind + " " + last.at.slice(0, 19) + ": " + last.reason : "none yet");
  }

  async function poll() {
    try {
      const response = await fetch(section.dataset.poll);
      if (response.ok) show(await response.json());
    } catch (error) { /* the server restarts: try again on the next tick */ }
  }
  window.setInterval(poll, 2000);
  document.getElementById("start-cycle").addEventListener("click", () =>
    act(() => api("POST", "/v1/loop/cycle"), "cycle started").then(poll));
};
