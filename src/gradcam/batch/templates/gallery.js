// The gallery's cards, drawn from the records embedded in the page (gradcam.batch.gallery).
// Builds the cards with createElement and textContent only: nothing from the run is parsed as HTML.
// Inlined in a <script> element, so it must never contain a less-than sign followed by a slash
// (that would end the element early); the tests check it.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const records = JSON.parse($("records").textContent);
  const grid = $("grid"), more = $("more"), count = $("count");
  const PAGE = Number(grid.dataset.pageSize);  // cards rendered at a time
  const controls = {sort: $("sort"), cls: $("class"), min: $("pmin"), max: $("pmax"), path: $("path"),
                    surprising: $("surprising")};
  let shown = [], rendered = 0;

  const classes = new Map();
  for (const r of records) if (!classes.has(r.class)) classes.set(r.class, r.target);
  const list = $("classes");
  for (const name of [...classes.keys()].sort((a, b) => a.localeCompare(b))) {
    const option = document.createElement("option");
    option.value = name;
    option.label = "#" + classes.get(name);
    list.appendChild(option);
  }
  const lowerClasses = new Set([...classes.keys()].map((c) => c.toLowerCase()));

  const percent = (p) => p === null ? "?" : (100 * p).toFixed(p < 0.001 ? 3 : p < 0.1 ? 2 : 1) + "%";
  const describe = (p) => p.class + " (#" + p.index + ") " + percent(p.probability);
  const byKey = (a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0) || (a.target ?? -1) - (b.target ?? -1);
  const prob = (r, missing) => r.probability === null ? missing : r.probability;
  const orders = {
    "probability-asc": (a, b) => prob(a, 2) - prob(b, 2) || byKey(a, b),
    "probability-desc": (a, b) => prob(b, -1) - prob(a, -1) || byKey(a, b),
    "name": byKey,
    "class": (a, b) => a.class.localeCompare(b.class) || prob(b, -1) - prob(a, -1) || byKey(a, b),
  };

  function filters() {
    const bound = (input, scale) => input.value.trim() === "" || isNaN(input.valueAsNumber)
      ? null : input.valueAsNumber / scale;
    const cls = controls.cls.value.trim().toLowerCase();
    return {
      cls, exact: lowerClasses.has(cls), index: cls.replace(/^#/, ""),
      min: bound(controls.min, 100), max: bound(controls.max, 100),
      path: controls.path.value.trim().toLowerCase(), surprising: controls.surprising.checked,
    };
  }

  function matches(r, f) {
    if (f.cls) {
      const name = r.class.toLowerCase();
      const hit = f.exact ? name === f.cls : name.includes(f.cls) || String(r.target) === f.index;
      if (!hit) return false;
    }
    if (f.min !== null && !(r.probability !== null && r.probability >= f.min)) return false;
    if (f.max !== null && !(r.probability !== null && r.probability <= f.max)) return false;
    if (f.path && !r.key.toLowerCase().includes(f.path)) return false;
    if (f.surprising && r.rank === 0) return false;
    return true;
  }

  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  function card(r) {
    const node = el("article", r.rank === 0 ? "card" : "card surprising");
    const lines = r.top5.map((p, i) => (i + 1) + ". " + describe(p));
    const link = el(r.overlay ? "a" : "div", "thumb");
    if (r.overlay) link.href = r.overlay;
    link.title = r.key + "\n" + lines.join("\n");
    if (r.thumb) {
      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = r.key + ": " + r.class;
      img.src = r.thumb;
      link.appendChild(img);
    } else {
      link.appendChild(el("span", "", r.overlay ? "no preview: open the overlay" : "overlay missing"));
    }
    node.appendChild(link);
    const meta = el("div", "meta");
    const key = el("div", "key", r.key);
    key.title = r.key;
    meta.appendChild(key);
    const what = el("div");
    what.append(el("span", "cls", r.class), " ", el("span", "idx", "#" + r.target));
    meta.appendChild(what);
    const score = el("div");
    const rank = r.rank === null ? "not in the top-5" : "rank " + (r.rank + 1) + " of the top-5";
    score.append(el("span", "prob", percent(r.probability)), " ", el("span", "rank", rank));
    meta.appendChild(score);
    if (r.top5.length) {
      const details = el("details", "top5");
      details.appendChild(el("summary", "", "top-5 predictions"));
      const ol = el("ol");
      for (const p of r.top5) {
        ol.appendChild(el("li", p.index === r.target ? "target" : "", describe(p)));
      }
      details.appendChild(ol);
      meta.appendChild(details);
    }
    node.appendChild(meta);
    return node;
  }

  function renderMore() {
    const end = Math.min(shown.length, rendered + PAGE);
    const fragment = document.createDocumentFragment();
    for (let i = rendered; i < end; i++) fragment.appendChild(card(shown[i]));
    grid.appendChild(fragment);
    rendered = end;
    const left = shown.length - rendered;
    more.hidden = left <= 0;
    more.textContent = "Show " + Math.min(PAGE, left).toLocaleString() + " more (" + left.toLocaleString()
      + " left)";
    count.textContent = shown.length.toLocaleString() + " of " + records.length.toLocaleString()
      + " cards match" + (left > 0 ? " (" + rendered.toLocaleString() + " shown)" : "");
  }

  function update() {
    const f = filters();
    const order = orders[controls.sort.value] || orders["probability-asc"];
    shown = records.filter((r) => matches(r, f)).sort(order);
    grid.replaceChildren();
    rendered = 0;
    renderMore();
  }

  let timer = 0;
  const later = () => { clearTimeout(timer); timer = setTimeout(update, 150); };
  for (const input of [controls.cls, controls.min, controls.max, controls.path]) {
    input.addEventListener("input", later);
  }
  controls.sort.addEventListener("change", update);
  controls.surprising.addEventListener("change", update);
  $("reset").addEventListener("click", () => {
    for (const input of [controls.cls, controls.min, controls.max, controls.path]) input.value = "";
    controls.surprising.checked = false;
    controls.sort.value = "probability-asc";
    update();
  });
  more.addEventListener("click", renderMore);
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting) && !more.hidden) renderMore();
    }, {rootMargin: "800px"}).observe(more);
  }
  update();
})();
