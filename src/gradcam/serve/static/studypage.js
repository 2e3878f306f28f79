// What the study's rater page (study.js) and results page (results.js) share: the study named by the
// address, its API root (and its admin view's address), element lookup by data-testid, storage that survives being switched off, and the
// API's error type. Loaded before either page's script; exposes window.gradcamStudyPage.
"use strict";

window.gradcamStudyPage = (() => {
  const path = window.location.pathname;
  const at = path.lastIndexOf("/studies/");
  const prefix = at >= 0 ? path.slice(0, at) : "";
  const studyId = at >= 0 ? decodeURIComponent(path.slice(at + "/studies/".length).split("/")[0]) : "";

  // Web storage can be unavailable (private windows, disabled storage): then values live in memory only.
  function storage(area, key) {
    return {
      get() {
        try {
          return window[area].getItem(key);
        } catch {
          return null;
        }
      },
      set(value) {
        try {
          window[area].setItem(key, value);
        } catch {
          /* not kept */
        }
      },
      forget() {
        try {
          window[area].removeItem(key);
        } catch {
          /* nothing kept */
        }
      },
    };
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  return {
    studyId,
    api: `${prefix}/v1/studies/${encodeURIComponent(studyId)}`,
    adminApi: `${prefix}/v1/admin/studies/${encodeURIComponent(studyId)}`,
    byTestId: (id) => document.querySelector(`[data-testid="${id}"]`),
    storage,
    ApiError,
  };
})();
