// The results page of a trust study (results.html documents the page and its data-testid attributes).
// Asks for the admin token, keeps it in sessionStorage for this tab, reads the study's state with it
// (while the study is queued or rendering it shows the progress and asks again every 2 s; a failed one
// shows its error), then fetches the results and fills the table; the CSV is fetched with the token too and saved through a blob link (a plain link
// could not carry the Authorization header, and a token in the address would leak into logs).
"use strict";

(() => {
  const { studyId, api, adminApi, byTestId, storage, ApiError } = window.gradcamStudyPage;
  const tokenKey = "gradcam-admin-token";
  const POLL_MS = 2000;

  const el = {
    name: byTestId("study-name"),
    models: byTestId("models"),
    form: byTestId("token-form"),
    input: byTestId("token-input"),
    error: byTestId("error"),
    state: byTestId("state"),
    results: byTestId("results"),
    summary: byTestId("summary"),
    body: byTestId("results-table").querySelector("tbody"),
    csv: byTestId("csv-download"),
    refresh: byTestId("refresh"),
    forget: byTestId("forget-token"),
    scaleTop: byTestId("scale-top"),
    scaleBottom: byTestId("scale-bottom"),
  };
  let polling = null; // the timer asking again for a study still being rendered

  const session = storage("sessionStorage", tokenKey); // asked again after a reload if not kept
  let token = session.get();

  async function fetchWithToken(url) {
    let response;
    try {
      response = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
    } catch {
      throw new ApiError(0, "The server cannot be reached.");
    }
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try {
        const data = await response.json();
        if (data && typeof data.detail === "string") detail = data.detail;
      } catch {
        /* not JSON */
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const signed = (value) => (value === null ? "–" : `${value > 0 ? "+" : ""}${value.toFixed(2)}`);
  const signedInt = (value) => `${value > 0 ? "+" : ""}${value}`;

  function cell(row, testId, text, number) {
    const td = document.createElement("td");
    td.dataset.testid = testId;
    td.textContent = text;
    if (number) td.className = "number";
    row.appendChild(td);
  }

  /** The study's state, shown while it is not ready; true when it is ready. */
  function showState(study) {
    el.name.textContent = study.name;
    el.state.dataset.state = study.state;
    const texts = {
      queued: "Queued for rendering: the pairs are made one study at a time.",
      rendering: `Rendering: ${study.done} of ${study.total} images looked at.`,
      failed: `Rendering failed: ${study.error}`,
    };
    el.state.textContent = texts[study.state] || "";
    el.state.hidden = study.state === "ready";
    return study.state === "ready";
  }

  function fill(results) {
    el.name.textContent = results.name;
    document.title = `${results.name}: results`;
    el.models.textContent = `${results.stronger_model} (stronger) vs ${results.weaker_model}`;
    el.summary.textContent = `${plural(results.ratings, "rating")} by ${plural(results.raters, "rater")}`;
    if (results.scale.length) {
      el.scaleTop.textContent = signedInt(results.scale[0].answer);
      el.scaleBottom.textContent = signedInt(results.scale[results.scale.length - 1].answer);
    }
    el.body.replaceChildren();
    for (const m of results.methods) {
      const row = document.createElement("tr");
      row.dataset.testid = "result-row";
      row.dataset.method = m.method;
      cell(row, "method", m.method, false);
      cell(row, "mean", signed(m.mean), true);
      cell(row, "ci", m.ci_low === null ? "–" : `[${signed(m.ci_low)}, ${signed(m.ci_high)}]`, true);
      cell(row, "ratings", String(m.ratings), true);
      cell(row, "raters", String(m.raters), true);
      cell(row, "pairs", String(m.pairs), true);
      cell(row, "note", m.ci_note || "", false);
      el.body.appendChild(row);
    }
    el.results.hidden = false;
    el.form.hidden = true;
  }

  async function load() {
    clearTimeout(polling);
    showError("");
    if (!token) {
      el.form.hidden = false;
      el.results.hidden = true;
      return;
    }
    try {
      const study = await (await fetchWithToken(adminApi)).json();
      el.form.hidden = true;
      if (!showState(study)) {
        el.results.hidden = true;
        if (study.state !== "failed") polling = setTimeout(load, POLL_MS);
        return;
      }
      const response = await fetchWithToken(`${api}/results`);
      fill(await response.json());
    } catch (error) {
      if (error.status === 401 || error.status === 403) {
        token = null;
        session.forget();
        el.form.hidden = false;
        el.results.hidden = true;
      }
      showError(error.message);
    }
  }

  async function downloadCsv() {
    showError("");
    try {
      const response = await fetchWithToken(`${api}/ratings.csv`);
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement("a");
      link.href = url;
      link.download = `study-${studyId}-ratings.csv`;
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      showError(error.message);
    }
  }

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    token = el.input.value.trim();
    if (!token) return;
    session.set(token);
    el.input.value = "";
    load();
  });
  el.refresh.addEventListener("click", load);
  el.csv.addEventListener("click", downloadCsv);
  el.forget.addEventListener("click", () => {
    token = null;
    session.forget();
    load();
  });

  if (!studyId) showError("This address names no study.");
  else load();
})();
