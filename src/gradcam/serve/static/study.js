// The rater's page of a trust study (study.html documents the page and its data-testid attributes).
// Flow: GET the study's public info; take the rater's token from the address's fragment (an invitation
// link /studies/<id>#<token>: browsers never send the fragment), else from localStorage, else, for an
// open study, POST .../raters for a new one; the fragment is then taken off the address bar. Every rater
// call sends the token as Authorization: Bearer, never in a URL. GET .../next shows the pair; each answer
// POSTs .../ratings and shows the next pair. A 409 (already rated, e.g. a second tab) just moves on. The
// answer buttons are made from the study's `scale` (the server's wording); a study still rendering (409)
// shows the server's message. No external URLs; works from any path prefix.
"use strict";

(() => {
  const { studyId, api, byTestId, storage, ApiError } = window.gradcamStudyPage;
  const storageKey = `gradcam-study-token:${studyId}`;
  const INVITATION_ONLY =
    "This study takes raters by invitation: open the link you were sent (it ends in #...).";

  const el = {
    name: byTestId("study-name"),
    loading: byTestId("loading"),
    error: byTestId("error"),
    pair: byTestId("pair"),
    current: byTestId("progress-current"),
    total: byTestId("progress-total"),
    bar: byTestId("progress-bar"),
    className: byTestId("class-name"),
    robotA: byTestId("robot-a"),
    robotB: byTestId("robot-b"),
    done: byTestId("done"),
    doneTotal: byTestId("done-total"),
    answers: byTestId("answers"),
    buttons: [],
  };

  let token = null; // the rater's secret
  let open = false; // the study lets raters join by themselves
  let current = null; // the pair on screen: {pair, ...}
  let busy = false;

  const store = storage("localStorage", storageKey); // the token; in memory only if unavailable

  /** The token of an invitation link, taken off the address bar (kept in storage for reloads). */
  function tokenFromLink() {
    const fragment = decodeURIComponent(window.location.hash.replace(/^#/, "")).trim();
    if (!fragment) return null;
    store.set(fragment);
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
    return fragment;
  }

  async function call(method, url, body) {
    const options = { method, headers: { Accept: "application/json" } };
    if (token) options.headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, options);
    } catch {
      throw new ApiError(0, "The server cannot be reached. Check the connection and reload the page.");
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) {
      const detail = data && typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`;
      throw new ApiError(response.status, detail);
    }
    return data;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  function setBusy(value) {
    busy = value;
    for (const button of el.buttons) button.disabled = value;
  }

  async function newRater() {
    if (!open) throw new ApiError(401, INVITATION_ONLY);
    token = null;
    const joined = await call("POST", `${api}/raters`);
    token = joined.token;
    store.set(token);
    return token;
  }

  async function fetchNext() {
    try {
      return await call("GET", `${api}/next`);
    } catch (error) {
      // A token this study does not know (a reset database, a link of another study): start afresh once
      // where the study is open; else the rater needs their own link.
      if (error.status !== 401) throw error;
      store.forget();
      if (!open) throw new ApiError(401, `${error.message}. ${INVITATION_ONLY}`);
      await newRater();
      return call("GET", `${api}/next`);
    }
  }

  function showPair(next) {
    current = next;
    const number = next.rated + 1;
    el.current.textContent = String(number);
    el.total.textContent = String(next.total);
    el.bar.max = next.total;
    el.bar.value = next.rated;
    el.className.textContent = next.class;
    el.robotA.src = `data:image/png;base64,${next.robot_a}`;
    el.robotB.src = `data:image/png;base64,${next.robot_b}`;
    el.robotA.dataset.pair = String(next.pair);
    el.robotB.dataset.pair = String(next.pair);
    el.pair.hidden = false;
    el.done.hidden = true;
  }

  function showDone(next) {
    current = null;
    el.doneTotal.textContent = String(next.total);
    el.pair.hidden = true;
    el.done.hidden = false;
  }

  async function advance() {
    const next = await fetchNext();
    el.loading.hidden = true;
    if (next.done) showDone(next);
    else showPair(next);
  }

  /** One button per step of the study's scale (the API's `scale`: the wording comes from the server). */
  function makeButtons(scale) {
    el.buttons = scale.map((step) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.answer = String(step.answer);
      button.dataset.testid = `answer-${step.answer}`;
      button.textContent = step.text;
      button.disabled = busy;
      button.addEventListener("click", () => answer(Number(button.dataset.answer)));
      return button;
    });
    el.answers.replaceChildren(...el.buttons);
  }

  async function answer(value) {
    if (busy || current === null) return;
    setBusy(true);
    showError("");
    try {
      try {
        await call("POST", `${api}/ratings`, { pair: current.pair, answer: value });
      } catch (error) {
        // 409: already rated (another tab: the first answer stands), or no longer the pair served
        if (error.status !== 409) throw error;
      }
      await advance();
    } catch (error) {
      showError(error.message);
    } finally {
      setBusy(false);
    }
  }

  async function start() {
    setBusy(true);
    try {
      if (!studyId) throw new ApiError(404, "This address names no study.");
      const linked = tokenFromLink();
      const info = await call("GET", api);
      open = Boolean(info.open);
      makeButtons(info.scale);
      el.name.textContent = info.name;
      document.title = `${info.name}: which robot is more reliable?`;
      token = linked || store.get() || (await newRater());
      await advance();
    } catch (error) {
      el.loading.hidden = true;
      showError(error.status === 404 ? `This study does not exist (${error.message}).` : error.message);
    } finally {
      setBusy(false);
    }
  }

  // An invitation link opened over this page (only the fragment changes, so the page does not reload).
  window.addEventListener("hashchange", () => {
    if (window.location.hash.length > 1) start();
  });

  start();
})();
