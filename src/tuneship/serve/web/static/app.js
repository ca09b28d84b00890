// tuneship pages: the API key (sessionStorage, sent as a bearer token) and the write actions of each page.
"use strict";

const KEY = "tuneship-api-key";

function apiKey() { return sessionStorage.getItem(KEY) || ""; }

function notice(text, isError) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function keyRequired() { return document.body.dataset.keyRequired === "true"; }

// Calls the /v1 API; a missing key where one is required is said, not thrown at the person.
async function api(method, url, body) {
  if (method !== "GET" && keyRequired() && !apiKey()) {
    throw new Error("This action needs the API key: enter it in the API key field at the top of the page.");
  }
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
  if (response.status === 401 || response.status === 403) {
    throw new Error("The server refused the API key (" + response.status + "): enter the key set as serve.api_key or TUNESHIP_API_KEY.");
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

function showKeyState() {
  const state = document.getElementById("key-state");
  if (apiKey()) state.textContent = "key set for this tab";
  else state.textContent = keyRequired() ? "no key: changes are refused until you enter one" : "";
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("key-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("api-key").value.trim();
    if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
    document.getElementById("api-key").value = "";
    showKeyState();
  });
  showKeyState();
  for (const init of window.tuneshipPages || []) init();
});

window.tuneship = { api, act, notice, apiKey };
