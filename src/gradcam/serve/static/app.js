// The Grad-CAM web app: upload an image, see the top-5 predictions and the map of a chosen class, method
// and model, alone or side by side. Talks to the JSON API of `gradcam serve` (URLs relative to the page,
// so a server behind a path prefix works too). Every server string goes in through textContent or an
// attribute, never as HTML. The data-testid attributes are listed at the top of index.html.
// For a detector the page draws each detection's box, label and score (SVG), for a segmenter the outline
// of the predicted mask (canvas), over the picture from the API's numbers: the server sends the heatmap,
// never an overlay.

const GUIDED_GRADCAM = "guided-gradcam";
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const el = {
  form: $("controls"),
  dropZone: $("drop-zone"),
  fileInput: $("file-input"),
  fileName: $("file-name"),
  preview: $("preview"),
  model: $("model-select"),
  method: $("method-select"),
  methodDescription: $("method-description"),
  classInput: $("class-input"),
  classList: $("class-datalist"),
  classClear: $("class-clear"),
  taskOptions: $("task-options"),
  minScoreField: $("min-score-field"),
  minScore: $("min-score-input"),
  topk: $("topk-input"),
  topkLabel: $("topk-label"),
  guidedToggle: $("guided-toggle"),
  opacity: $("opacity-slider"),
  opacityValue: $("opacity-value"),
  compareToggle: $("compare-toggle"),
  compareOptions: $("compare-options"),
  compareByModel: $("compare-by-model"),
  compareByMethod: $("compare-by-method"),
  compareModel: $("compare-model-select"),
  compareMethod: $("compare-method-select"),
  compareModelField: $("compare-model-field"),
  compareMethodField: $("compare-method-field"),
  results: $("results"),
  busy: $("busy"),
  busyText: $("busy-text"),
  errorBox: $("error-box"),
  emptyState: $("empty-state"),
};

const state = {
  image: null, // the uploaded image, read into memory once: changes re-send it without the disk
  imageName: "",
  previewUrl: null,
  models: [], // [{name, default, task, input_size, classes}]
  methods: [], // [{name, description, guided}]
  labels: new Map(), // model name -> Promise of its label list
  lastCamMethod: "gradcam", // the method to go back to when the Guided Grad-CAM toggle is switched off
  controller: null, // aborts the request in flight when a newer one starts
  seq: 0, // number of the latest request: only its answer is shown
  shownKey: null, // the settings of the answer on screen (or in flight): the same settings are not re-sent
};

class ApiError extends Error {}

/** The one-line message of a failed response: the API's `detail`, else the HTTP status. */
function describeFailure(response, body) {
  const detail = body && body.detail;
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail) && detail.length) {
    return detail.map((item) => (item && item.msg) || JSON.stringify(item)).join("; ");
  }
  return `The server answered ${response.status} ${response.statusText}`.trim();
}

async function fetchJson(path, options = {}) {
  const response = await fetch(new URL(path, document.baseURI), options);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null; // an error page that is not JSON: fall back to the status line
  }
  if (!response.ok) throw new ApiError(describeFailure(response, body));
  if (body === null) throw new ApiError(`The server sent no JSON for ${path}`);
  return body;
}

// ---- messages and progress -------------------------------------------------------------------------

function showError(message) {
  el.errorBox.textContent = message;
  el.errorBox.hidden = false;
}

function clearError() {
  el.errorBox.textContent = "";
  el.errorBox.hidden = true;
}

function setBusy(busy, text = "Explaining…") {
  el.busy.hidden = !busy;
  el.busyText.textContent = text;
  el.results.setAttribute("aria-busy", busy ? "true" : "false");
  el.results.classList.toggle("is-busy", busy);
}

// ---- choices: models, methods, labels --------------------------------------------------------------

function fillSelect(select, items, selected) {
  select.replaceChildren(
    ...items.map(({ value, text, title }) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = text;
      if (title) option.title = title;
      return option;
    }),
  );
  if (selected !== undefined && items.some((item) => item.value === selected)) select.value = selected;
}

function methodInfo(name) {
  return state.methods.find((m) => m.name === name);
}

function isGuided(name) {
  const info = methodInfo(name);
  return Boolean(info && info.guided);
}

function labelsOf(model) {
  if (!state.labels.has(model)) {
    const request = fetchJson(`v1/models/${encodeURIComponent(model)}/labels`).then((body) => body.labels);
    request.catch(() => state.labels.delete(model)); // try again next time
    state.labels.set(model, request);
  }
  return state.labels.get(model);
}

async function showLabels(model) {
  try {
    const labels = await labelsOf(model);
    if (el.model.value !== model) return; // the model changed meanwhile
    el.classList.replaceChildren(
      ...labels.map((label, index) => {
        const option = document.createElement("option");
        option.value = label;
        option.label = `#${index}`;
        return option;
      }),
    );
  } catch (error) {
    showError(`Could not load the classes of ${model}: ${error.message}`);
  }
}

function describeMethod() {
  const info = methodInfo(el.method.value);
  el.methodDescription.textContent = info ? info.description : "";
  el.guidedToggle.checked = el.method.value === GUIDED_GRADCAM;
  if (!isGuided(el.method.value)) state.lastCamMethod = el.method.value;
}

function syncCompareChoices() {
  const byModel = el.compareByModel.checked;
  el.compareModelField.hidden = !byModel;
  el.compareMethodField.hidden = byModel;
  // The right panel should differ from the left one: move it off the left panel's choice.
  if (el.compareModel.value === el.model.value) {
    const other = state.models.find((m) => m.name !== el.model.value);
    if (other) el.compareModel.value = other.name;
  }
  if (el.compareMethod.value === el.method.value) {
    const preferred = el.method.value === "gradcam++" ? "gradcam" : "gradcam++";
    const other = methodInfo(preferred) ? preferred : state.methods.find((m) => m.name !== el.method.value)?.name;
    if (other) el.compareMethod.value = other;
  }
}

function taskOf(model) {
  const info = state.models.find((m) => m.name === model);
  return (info && info.task) || "classification";
}

/** The fields of a segmenter or detector, shown when a chosen model is one. */
function syncTaskOptions() {
  const tasks = currentSettings().models.map(taskOf);
  const detection = tasks.includes("detection");
  el.taskOptions.hidden = !tasks.some((task) => task !== "classification");
  el.minScoreField.hidden = !detection;
  el.topkLabel.textContent = detection ? "Most detections" : "Classes (largest predicted first)";
}

async function loadChoices() {
  setBusy(true, "Loading the models…");
  try {
    const [models, methods] = await Promise.all([fetchJson("v1/models"), fetchJson("v1/methods")]);
    state.models = models.models;
    state.methods = methods.methods;
  } catch (error) {
    setBusy(false);
    showError(`Could not load the models and methods: ${error.message}`);
    return;
  }
  const modelItems = state.models.map((m) => ({
    value: m.name,
    text: m.default ? `${m.name} (default)` : m.name,
    title: `${m.classes} classes, input ${m.input_size.join("×")}`,
  }));
  const methodItems = state.methods.map((m) => ({ value: m.name, text: m.name, title: m.description }));
  const defaultModel = (state.models.find((m) => m.default) || state.models[0])?.name;
  fillSelect(el.model, modelItems, defaultModel);
  fillSelect(el.compareModel, modelItems);
  fillSelect(el.method, methodItems, methodInfo("gradcam") ? "gradcam" : undefined);
  fillSelect(el.compareMethod, methodItems);
  el.compareByModel.disabled = state.models.length < 2;
  el.guidedToggle.disabled = !methodInfo(GUIDED_GRADCAM);
  el.model.disabled = false;
  el.method.disabled = false;
  describeMethod();
  syncCompareChoices();
  syncTaskOptions();
  setBusy(false);
  await showLabels(el.model.value);
  if (state.image) refresh(); // an image chosen while the choices were loading
}

// ---- the image -------------------------------------------------------------------------------------

async function setImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (its type is ${file.type})`);
    return;
  }
  let bytes;
  try {
    bytes = await file.arrayBuffer();
  } catch (error) {
    showError(`Could not read ${file.name}: ${error.message}`);
    return;
  }
  state.image = new Blob([bytes], { type: file.type || "application/octet-stream" });
  state.imageName = file.name || "pasted image";
  state.shownKey = null;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(state.image);
  el.preview.src = state.previewUrl;
  el.preview.alt = `Preview of ${state.imageName}`;
  el.preview.hidden = false;
  el.fileName.textContent = state.imageName;
  el.dropZone.classList.add("has-image");
  el.classInput.value = ""; // a new image starts at its own top prediction
  clearError();
  refresh();
}

// ---- requests --------------------------------------------------------------------------------------

function currentSettings() {
  const compare = el.compareToggle.checked;
  const byModel = compare && el.compareByModel.checked;
  const byMethod = compare && !byModel;
  const models = byModel ? [el.model.value, el.compareModel.value] : [el.model.value];
  const tasks = models.map(taskOf);
  const detection = tasks.includes("detection");
  const segmentation = tasks.includes("segmentation");
  return {
    compare,
    models,
    methods: byMethod ? [el.method.value, el.compareMethod.value] : [el.method.value],
    target: el.classInput.value.trim(),
    minScore: detection ? el.minScore.value.trim() : "",
    topk: detection || segmentation ? el.topk.value.trim() : "",
  };
}

function buildForm(settings) {
  const form = new FormData();
  form.append("image", state.image, state.imageName);
  for (const model of settings.models) form.append("model", model);
  for (const method of settings.methods) form.append("method", method);
  if (settings.target) form.append("target", settings.target);
  if (settings.minScore) form.append("min_score", settings.minScore);
  if (settings.topk) form.append("topk", settings.topk);
  return form;
}

/** Ask for the maps of the current settings; a newer call aborts an older one still running. */
async function refresh({ force = false } = {}) {
  if (!state.image || !state.models.length) return;
  const settings = currentSettings();
  const key = JSON.stringify(settings);
  if (!force && key === state.shownKey) return;
  state.shownKey = key;
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const mine = ++state.seq;
  const what = settings.compare ? "Comparing" : "Explaining";
  setBusy(true, `${what} ${state.imageName} with ${settings.methods.join(" and ")} on ${settings.models.join(" and ")}…`);
  const started = performance.now();
  try {
    const body = await fetchJson(settings.compare ? "v1/compare" : "v1/explain", {
      method: "POST",
      body: buildForm(settings),
      signal: controller.signal,
    });
    if (mine !== state.seq) return; // a newer request has started: its answer is the one to show
    const elapsed = (performance.now() - started) / 1000;
    clearError();
    if (settings.compare) {
      showResult(panels.left, body.left, elapsed);
      showResult(panels.right, body.right, elapsed);
    } else {
      showResult(panels.left, body, elapsed);
      panels.right.root.hidden = true;
    }
    el.emptyState.hidden = true;
  } catch (error) {
    if (error.name === "AbortError" || mine !== state.seq) return;
    state.shownKey = null; // the same settings may be tried again
    showError(error instanceof ApiError ? error.message : `The request failed: ${error.message}`);
  } finally {
    if (mine === state.seq) {
      setBusy(false);
      state.controller = null;
    }
  }
}

// ---- results ---------------------------------------------------------------------------------------

function makePanel(root) {
  root.replaceChildren($("panel-template").content.cloneNode(true));
  const find = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  return {
    root,
    title: find("panel-title"),
    explained: find("explained-class"),
    overlay: find("overlay"),
    picture: find("overlay-picture"),
    heatmap: find("heatmap-picture"),
    marks: find("marks"),
    outline: find("mask-outline"),
    targets: find("target-list"),
    targetsTitle: root.querySelector(".targets-title"),
    predictionsTitle: root.querySelector(".predictions-title"),
    guided: find("guided"),
    guidedPicture: find("guided-picture"),
    guidedCaption: root.querySelector(".guided-caption"),
    downloadOverlay: find("download-overlay"),
    downloadHeatmap: find("download-heatmap"),
    downloadGuided: find("download-guided"),
    topk: find("topk-list"),
    timing: find("timing"),
    result: null,
    shown: 0, // the position in result.targets of the target whose heatmap is shown
  };
}

const panels = { left: makePanel($("left-panel")), right: makePanel($("right-panel")) };

const percent = (p) => `${(100 * p).toFixed(1)} %`;
const scoreText = (s) => s.toFixed(2);
const png = (base64) => `data:image/png;base64,${base64}`;

/** Width and height of a base64 PNG, read from its IHDR chunk (bytes 16..24). */
function pngSize(base64) {
  const head = atob(base64.slice(0, 32));
  const word = (at) =>
    ((head.charCodeAt(at) << 24) | (head.charCodeAt(at + 1) << 16) | (head.charCodeAt(at + 2) << 8) |
      head.charCodeAt(at + 3)) >>> 0;
  return [word(16), word(20)];
}

function fileStem(...parts) {
  const stem = state.imageName.replace(/\.[^.]*$/, "");
  return [stem, ...parts]
    .join("-")
    .replace(/[^\w.+-]+/g, "_")
    .slice(0, 120);
}

function setDownload(link, base64, name) {
  link.hidden = !base64;
  if (base64) {
    link.href = png(base64);
    link.download = name;
  } else {
    link.removeAttribute("href");
  }
}

/** One line on what is explained: the class and its probability, a detection and its score, a segmented
 * class and its share of the image; or why there is nothing to explain. */
function describeTarget(result, target) {
  if (!target) return result.none ? `Nothing to explain: ${result.none}` : "";
  const name = `“${target.class}” (#${target.index})`;
  if (target.detection) {
    return `Explaining detection ${target.detection.index + 1}, ${name}, score ${scoreText(target.detection.score)}`;
  }
  if (target.mask) return `Explaining ${name}, predicted on ${percent(target.mask.fraction)} of the image`;
  if (target.probability === null || target.probability === undefined) {
    return `Explaining ${name}, score ${scoreText(target.score)}`;
  }
  return `Explaining ${name}, probability ${percent(target.probability)}`;
}

function showResult(panel, result, elapsed) {
  panel.result = result;
  panel.shown = 0;
  panel.title.textContent = `${result.model} · ${result.method}`;
  panel.picture.src = png(result.picture);
  panel.picture.alt = `${state.imageName} as ${result.model} sees it`;
  showTarget(panel);
  showTargetList(panel);
  const server = typeof result.seconds === "number" ? `${result.seconds.toFixed(2)} s on the server, ` : "";
  panel.timing.textContent = `${server}${elapsed.toFixed(2)} s in all`;
  panel.root.hidden = false;
}

/** The shown target (panel.shown): its heatmap or guided picture, the marks, the downloads. */
function showTarget(panel) {
  const result = panel.result;
  const target = result.targets[panel.shown];
  const methodName = result.method;
  panel.explained.textContent = describeTarget(result, target);
  const className = target ? target.class : "";

  const hasMap = Boolean(target && target.heatmap);
  // Hidden only for guided-backprop (no map); an image with nothing to explain still shows its picture.
  panel.overlay.hidden = Boolean(target) && !hasMap;
  panel.heatmap.hidden = !hasMap;
  if (hasMap) {
    panel.heatmap.src = png(target.heatmap);
    panel.heatmap.alt = `${methodName} heatmap of “${className}”`;
  } else {
    panel.heatmap.removeAttribute("src");
  }
  drawBoxes(panel);
  drawOutline(panel);
  const hasGuided = Boolean(target && target.guided);
  panel.guided.hidden = !hasGuided;
  if (hasGuided) {
    const [width, height] = pngSize(result.picture);
    panel.guidedPicture.src = png(target.guided);
    // The guided picture comes in the model's input view: show it in the picture's proportions.
    panel.guidedPicture.style.aspectRatio = `${width} / ${height}`;
    const label = methodName === "guided-backprop" ? "Guided Backpropagation" : "Guided Grad-CAM";
    panel.guidedCaption.textContent = label;
    panel.guidedPicture.alt = `${label} of “${className}”`;
  } else {
    panel.guidedPicture.removeAttribute("src");
  }
  const stem = (kind) => `${fileStem(result.model, methodName, className)}-${kind}.png`;
  // The overlay is composed here, from the picture and the heatmap, at the slider's opacity.
  setDownload(panel.downloadOverlay, hasMap ? target.heatmap : null, stem("overlay"));
  if (hasMap) {
    Promise.all([panel.picture.decode(), panel.heatmap.decode()])
      .then(() => {
        if (panel.result === result && result.targets[panel.shown] === target) {
          panel.downloadOverlay.href = composeOverlay(panel);
        }
      })
      .catch(() => {}); // drawn again when the link is clicked
  }
  setDownload(panel.downloadHeatmap, hasMap ? target.heatmap : null, stem("heatmap"));
  setDownload(panel.downloadGuided, hasGuided ? target.guided : null, stem("guided"));
  showPredictions(panel, result, target);
  for (const item of panel.targets.children) {
    if (Number(item.dataset.n) === panel.shown) item.setAttribute("aria-current", "true");
    else item.removeAttribute("aria-current");
  }
}

/** Every detection's box with its label and score, in the uploaded image's pixels (the SVG's viewBox
 * is the API's `size`; it is stretched over the picture, which is the whole image shrunk). */
function drawBoxes(panel) {
  const result = panel.result;
  const [width, height] = result.size;
  panel.marks.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const fontSize = 0.035 * Math.max(width, height);
  const boxes = result.targets
    .map((target, n) => ({ target, n }))
    .filter(({ target }) => target.detection)
    .map(({ target, n }) => {
      const [x0, y0, x1, y1] = target.detection.box;
      const group = document.createElementNS(SVG, "g");
      group.setAttribute("class", n === panel.shown ? "mark-box is-shown" : "mark-box");
      group.dataset.testid = "box";
      group.dataset.n = String(n);
      const rect = document.createElementNS(SVG, "rect");
      rect.dataset.testid = "box-rect";
      rect.setAttribute("x", String(x0));
      rect.setAttribute("y", String(y0));
      rect.setAttribute("width", String(Math.max(0, x1 - x0)));
      rect.setAttribute("height", String(Math.max(0, y1 - y0)));
      const label = document.createElementNS(SVG, "text");
      label.dataset.testid = "box-label";
      label.setAttribute("x", String(x0 + fontSize * 0.2));
      label.setAttribute("y", String(y0 > fontSize * 1.1 ? y0 - fontSize * 0.25 : y0 + fontSize));
      label.setAttribute("font-size", String(fontSize));
      label.textContent = `${target.class} ${scoreText(target.detection.score)}`;
      group.append(rect, label);
      return group;
    });
  // The shown box last: drawn on top of the others.
  boxes.sort((a, b) => (a.dataset.n === String(panel.shown)) - (b.dataset.n === String(panel.shown)));
  panel.marks.replaceChildren(...boxes);
}

/** The outline of the shown target's predicted mask: the mask's pixels next to a pixel outside it,
 * found from the API's mask PNG (at the segmenter's output size) and stretched over the picture. */
function drawOutline(panel) {
  const result = panel.result;
  const target = result.targets[panel.shown];
  const canvas = panel.outline;
  canvas.hidden = true;
  if (!target || !target.mask) return;
  const mask = new Image();
  mask.onload = () => {
    if (panel.result !== result || result.targets[panel.shown] !== target) return; // changed meanwhile
    const { width, height } = mask;
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    context.drawImage(mask, 0, 0);
    const inside = context.getImageData(0, 0, width, height).data;
    const at = (x, y) => x >= 0 && y >= 0 && x < width && y < height && inside[4 * (y * width + x)] > 127;
    const out = context.createImageData(width, height);
    // About two display pixels thick: the picture is shown at most 512 pixels wide.
    const reach = Math.max(1, Math.round(Math.max(width, height) / 400));
    for (let y = 0; y < height; y += 1) {
      for (let x = 0; x < width; x += 1) {
        if (!at(x, y)) continue;
        let edge = false;
        for (let d = 1; d <= reach && !edge; d += 1) {
          edge = !at(x - d, y) || !at(x + d, y) || !at(x, y - d) || !at(x, y + d);
        }
        if (edge) out.data.set([0, 229, 255, 255], 4 * (y * width + x));
      }
    }
    context.putImageData(out, 0, 0);
    canvas.hidden = false;
  };
  mask.src = png(target.mask.png);
}

/** A segmenter's or detector's explained targets, each a button that shows its heatmap. */
function showTargetList(panel) {
  const result = panel.result;
  const listed = result.task && result.task !== "classification";
  panel.targets.hidden = !listed || !result.targets.length;
  panel.targetsTitle.hidden = panel.targets.hidden;
  panel.targetsTitle.textContent = result.task === "detection" ? "Detections" : "Segmented classes";
  if (!listed) {
    panel.targets.replaceChildren();
    return;
  }
  panel.targets.replaceChildren(
    ...result.targets.map((target, n) => {
      const item = document.createElement("li");
      item.className = "prediction";
      item.dataset.testid = "target";
      item.dataset.n = String(n);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "prediction-button";
      button.title = `Show the heatmap of “${target.class}”`;
      const name = document.createElement("span");
      name.className = "prediction-name";
      name.textContent = target.detection ? `${target.detection.index + 1}. ${target.class}` : target.class;
      const value = document.createElement("span");
      value.className = "prediction-probability";
      const share = target.mask ? target.mask.fraction : null;
      value.textContent = target.detection ? scoreText(target.detection.score) : percent(share || 0);
      const bar = document.createElement("span");
      bar.className = "prediction-bar";
      bar.setAttribute("aria-hidden", "true");
      const amount = target.detection ? target.detection.score : share || 0;
      bar.style.setProperty("--p", String(Math.max(0, Math.min(1, amount))));
      button.append(name, value, bar);
      button.addEventListener("click", () => {
        panel.shown = n;
        showTarget(panel);
      });
      if (n === panel.shown) item.setAttribute("aria-current", "true");
      item.append(button);
      return item;
    }),
  );
}

/** A classifier's top-5, each a button that explains that class (hidden for other models). */
function showPredictions(panel, result, target) {
  const none = !result.predictions.length && result.task && result.task !== "classification";
  panel.topk.hidden = none;
  panel.predictionsTitle.hidden = none;
  panel.topk.replaceChildren(
    ...result.predictions.map((prediction) => {
      const item = document.createElement("li");
      item.className = "prediction";
      item.dataset.testid = "prediction";
      item.dataset.index = String(prediction.index);
      item.dataset.class = prediction.class;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "prediction-button";
      button.title = `Explain “${prediction.class}”`;
      const name = document.createElement("span");
      name.className = "prediction-name";
      name.textContent = prediction.class;
      const value = document.createElement("span");
      value.className = "prediction-probability";
      value.textContent = percent(prediction.probability);
      const bar = document.createElement("span");
      bar.className = "prediction-bar";
      bar.setAttribute("aria-hidden", "true");
      bar.style.setProperty("--p", String(Math.max(0, Math.min(1, prediction.probability))));
      button.append(name, value, bar);
      button.addEventListener("click", () => {
        el.classInput.value = prediction.class;
        refresh();
      });
      if (target && prediction.index === target.index) item.setAttribute("aria-current", "true");
      item.append(button);
      return item;
    }),
  );
}

// ---- opacity and the overlay download --------------------------------------------------------------

function applyOpacity() {
  const value = Number(el.opacity.value);
  document.documentElement.style.setProperty("--heatmap-opacity", String(value / 100));
  el.opacityValue.textContent = `${value} %`;
}

/** The picture with the heatmap over it at the slider's opacity, and the boxes or mask outline drawn as
 * on the page, as a PNG data URL (the server sends the picture and the heatmap; the overlay is made only
 * here). */
function composeOverlay(panel) {
  const { picture, heatmap, outline, result } = panel;
  const canvas = document.createElement("canvas");
  canvas.width = picture.naturalWidth;
  canvas.height = picture.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(picture, 0, 0);
  context.globalAlpha = Number(el.opacity.value) / 100;
  context.drawImage(heatmap, 0, 0, canvas.width, canvas.height);
  context.globalAlpha = 1;
  if (!outline.hidden && outline.width) context.drawImage(outline, 0, 0, canvas.width, canvas.height);
  const scale = canvas.width / result.size[0];
  context.lineWidth = 2;
  context.font = `600 ${Math.max(10, Math.round(0.035 * Math.max(canvas.width, canvas.height)))}px sans-serif`;
  result.targets.forEach((target, n) => {
    if (!target.detection) return;
    const [x0, y0, x1, y1] = target.detection.box.map((v) => v * scale);
    context.strokeStyle = n === panel.shown ? "#00e5ff" : "#ffffff";
    context.fillStyle = context.strokeStyle;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    context.fillText(`${target.class} ${scoreText(target.detection.score)}`, x0 + 2, Math.max(12, y0 - 3));
  });
  return canvas.toDataURL("image/png");
}

function wireOverlayDownload(panel) {
  panel.downloadOverlay.addEventListener("click", (event) => {
    // Runs before the link is followed, so the href set here is the one downloaded.
    const target = panel.result && panel.result.targets[panel.shown];
    if (!target || !target.heatmap) return;
    const ready = panel.picture.complete && panel.heatmap.complete && panel.picture.naturalWidth > 0;
    if (ready) {
      panel.downloadOverlay.href = composeOverlay(panel);
      return;
    }
    // The pictures are still decoding: follow the link once they are.
    event.preventDefault();
    Promise.all([panel.picture.decode(), panel.heatmap.decode()])
      .then(() => panel.downloadOverlay.click())
      .catch((error) => showError(`Could not draw the overlay: ${error.message}`));
  });
}

// ---- events ----------------------------------------------------------------------------------------

function onDrop(event) {
  event.preventDefault();
  el.dropZone.classList.remove("is-dragging");
  const files = [...(event.dataTransfer?.files || [])];
  if (files.length) setImage(files[0]);
}

function wire() {
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    refresh();
  });
  el.fileInput.addEventListener("change", () => {
    setImage(el.fileInput.files[0]);
    el.fileInput.value = ""; // choosing the same file again still counts as a change
  });
  // Drops anywhere on the page count (and a missed drop never navigates away from the page).
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    el.dropZone.classList.add("is-dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) el.dropZone.classList.remove("is-dragging");
  });
  window.addEventListener("drop", onDrop);
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      setImage(file);
    }
  });

  el.model.addEventListener("change", () => {
    syncCompareChoices();
    syncTaskOptions();
    showLabels(el.model.value);
    refresh();
  });
  el.minScore.addEventListener("change", () => refresh());
  el.topk.addEventListener("change", () => refresh());
  el.method.addEventListener("change", () => {
    describeMethod();
    syncCompareChoices();
    refresh();
  });
  el.guidedToggle.addEventListener("change", () => {
    el.method.value = el.guidedToggle.checked ? GUIDED_GRADCAM : state.lastCamMethod;
    describeMethod();
    syncCompareChoices();
    refresh();
  });
  // A class is asked for when the input holds a whole label (picked from the list or typed), or on Enter
  // or leaving the field (any text: the server says when it names no class).
  let typing = null;
  el.classInput.addEventListener("input", async () => {
    clearTimeout(typing);
    const value = el.classInput.value.trim().toLowerCase();
    if (!value) return;
    let labels = [];
    try {
      labels = await labelsOf(el.model.value);
    } catch {
      return;
    }
    if (labels.some((label) => label.toLowerCase() === value)) typing = setTimeout(refresh, 150);
  });
  el.classInput.addEventListener("change", () => refresh());
  el.classClear.addEventListener("click", () => {
    el.classInput.value = "";
    refresh();
    el.classInput.focus();
  });
  el.opacity.addEventListener("input", applyOpacity);
  el.compareToggle.addEventListener("change", () => {
    el.compareOptions.hidden = !el.compareToggle.checked;
    el.results.classList.toggle("is-comparing", el.compareToggle.checked);
    syncCompareChoices();
    syncTaskOptions();
    refresh();
  });
  for (const input of [el.compareByModel, el.compareByMethod, el.compareModel, el.compareMethod]) {
    input.addEventListener("change", () => {
      syncCompareChoices();
      syncTaskOptions();
      refresh();
    });
  }
  wireOverlayDownload(panels.left);
  wireOverlayDownload(panels.right);
}

wire();
applyOpacity();
loadChoices();
