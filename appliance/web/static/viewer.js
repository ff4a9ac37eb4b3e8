// Slice viewer beside the findings: the stored images in stacking order, windowed in the browser from HU,
// with coronal and sagittal planes cut from the series' reduced volume, a model's overlay, free
// window/level, zoom, pan, distance and HU region measurements. Every word shown comes from the page
// (template text and data attributes), so the viewer speaks the page's language.
(function () {
  "use strict";
  const WINDOWS = { lung: [-600, 1500], mediastinum: [50, 350], abdomen: [40, 400], bone: [400, 1800] }; // [level, width] HU
  const PRESET_KEYS = { l: "lung", m: "mediastinum", a: "abdomen", b: "bone" };
  const TOOL_KEYS = { s: "scroll", w: "wl", p: "pan", z: "zoom", d: "distance", r: "roi" };
  const PLANE_KEYS = { 1: "axial", 2: "coronal", 3: "sagittal" };
  const MOVES = { ArrowDown: 1, ArrowUp: -1, ArrowRight: 1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
  // slices per request when prefetching; bench/viewer_speed.py sets window.viewerFetchBatch = 1 to compare
  const BATCH = Math.max(1, Math.min(32, Number(window.viewerFetchBatch) || 8));
  const CACHE_BYTES = 96 * 2 ** 20;   // decoded slices kept in the browser
  const DRAG_PX_PER_SLICE = 4;
  const ZOOM_STEP = 1.25;
  const lang = document.documentElement.lang || undefined;

  const stats = { firstDrawMs: null, draws: 0, seen: new Set(),
                  distinct() { return this.seen.size; }, reset() { this.seen.clear(); this.draws = 0; } };
  window.viewerStats = stats;

  function number(value, digits) {
    return Number(value).toLocaleString(lang, { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  function fill(template, values) { return template.replace(/\{(\w+)\}/g, (m, name) => values[name]); }

  function roiStats(img, a, b) {
    // HU statistics of the pixels whose centres lie inside the ellipse drawn in the box a-b (image pixels)
    const cx = (a[0] + b[0]) / 2, cy = (a[1] + b[1]) / 2, rx = Math.abs(b[0] - a[0]) / 2, ry = Math.abs(b[1] - a[1]) / 2;
    if (rx < 0.5 || ry < 0.5) return null;
    let n = 0, sum = 0, sq = 0, min = Infinity, max = -Infinity;
    const i0 = Math.max(0, Math.floor(cy - ry)), i1 = Math.min(img.rows - 1, Math.ceil(cy + ry));
    const j0 = Math.max(0, Math.floor(cx - rx)), j1 = Math.min(img.cols - 1, Math.ceil(cx + rx));
    for (let i = i0; i <= i1; i++) {
      const dy = (i + 0.5 - cy) / ry;
      for (let j = j0; j <= j1; j++) {
        const dx = (j + 0.5 - cx) / rx;
        if (dx * dx + dy * dy > 1) continue;
        const v = img.hu[i * img.cols + j];
        n++; sum += v; sq += v * v; if (v < min) min = v; if (v > max) max = v;
      }
    }
    if (!n) return null;
    const mean = sum / n;
    return { n, mean, sd: Math.sqrt(Math.max(0, sq / n - mean * mean)), min, max, area: n * img.rowMm * img.colMm };
  }

  function Viewer(root) {
    const base = root.dataset.base;
    const stage = root.querySelector(".viewer-stage");
    const canvas = root.querySelector("[data-canvas]");
    const overlayImg = root.querySelector("[data-overlay]");
    const slider = root.querySelector("[data-slice-slider]");
    const label = root.querySelector("[data-slice-label]");
    const toggle = root.querySelector("[data-overlay-toggle]");
    const opacity = root.querySelector("[data-overlay-opacity]");
    const modelSelect = root.querySelector("[data-overlay-model]");
    const measureList = root.querySelector("[data-measurements]");
    const out = { ww: root.querySelector("[data-show-ww]"), wc: root.querySelector("[data-show-wc]"), zoom: root.querySelector("[data-show-zoom]") };
    const ctx = canvas.getContext("2d");
    const buf = document.createElement("canvas"), bctx = buf.getContext("2d");
    const axial = new Map(), inflight = new Map(), planes = { coronal: new Map(), sagittal: new Map() };
    const view = { plane: "axial", index: { axial: 0, coronal: 0, sagittal: 0 }, zoom: 1, panX: 0, panY: 0,
                   level: WINDOWS.lung[0], width: WINDOWS.lung[1], preset: "lung", tool: "scroll", direction: 1 };
    let info = null, current = null, bufKey = "", pending = false, draws = 0, drag = null, measurements = [];
    let resolveReady;
    const ready = new Promise((resolve) => { resolveReady = resolve; });

    // ---- pixels -------------------------------------------------------------------------------------
    function slices(res) {
      const rows = +res.headers.get("X-Rows"), cols = +res.headers.get("X-Columns");
      return res.arrayBuffer().then((data) => ({ rows, cols, data }));
    }
    function fetchAxial(start, count) {
      return fetch(base + "/slices/" + start + "/" + count).then((res) => {
        if (!res.ok) throw new Error(String(res.status));
        return slices(res);
      }).then(({ rows, cols, data }) => {
        const size = rows * cols * 2, [rowMm, colMm] = info.pixel_spacing_mm || [1, 1];
        for (let i = 0; i * size < data.byteLength; i++) {
          axial.set(start + i, { plane: "axial", k: start + i, rows, cols, rowMm, colMm,
                                 hu: new Int16Array(data.slice(i * size, (i + 1) * size)) });
        }
        trim();
      });
    }
    function trim() {
      let bytes = 0;
      axial.forEach((s) => { bytes += s.hu.byteLength; });
      if (bytes <= CACHE_BYTES) return;
      const far = [...axial.keys()].sort((a, b) => Math.abs(b - view.index.axial) - Math.abs(a - view.index.axial));
      for (const k of far) {
        if (bytes <= CACHE_BYTES * 0.8) break;
        bytes -= axial.get(k).hu.byteLength; axial.delete(k);
      }
    }
    function ensureBlock(start) {
      if (start < 0 || start >= info.slices || inflight.has(start)) return inflight.get(start);
      let missing = false;
      for (let k = start; k < Math.min(info.slices, start + BATCH); k++) missing = missing || !axial.has(k);
      if (!missing) return Promise.resolve();
      const p = fetchAxial(start, Math.min(BATCH, info.slices - start)).finally(() => inflight.delete(start));
      inflight.set(start, p);
      return p;
    }
    function loadAxial(k) {
      if (axial.has(k)) return Promise.resolve(axial.get(k));
      const start = Math.floor(k / BATCH) * BATCH;
      // the first image alone (one small answer), then whole blocks around it
      const p = !axial.size && !inflight.size ? fetchAxial(k, 1) : ensureBlock(start);
      return p.then(() => axial.get(k));
    }
    function prefetch(k) {
      const start = Math.floor(k / BATCH) * BATCH, d = view.direction * BATCH;
      [start, start + d, start + 2 * d, start - d].forEach((s) => { const p = ensureBlock(s); if (p) p.catch(() => {}); });
    }
    function loadPlane(name, k) {
      const cache = planes[name];
      if (cache.has(k)) return Promise.resolve(cache.get(k));
      return fetch(base + "/reformat/" + name + "/" + k).then((res) => {
        if (!res.ok) throw new Error(String(res.status));
        const [rowMm, colMm] = res.headers.get("X-Pixel-Spacing").split("\\").map(Number);
        return slices(res).then(({ rows, cols, data }) => {
          const img = { plane: name, k, rows, cols, rowMm, colMm, hu: new Int16Array(data) };
          cache.set(k, img);
          if (cache.size > 64) cache.delete(cache.keys().next().value);
          return img;
        });
      });
    }
    function load(name, k) { return name === "axial" ? loadAxial(k) : loadPlane(name, k); }

    // ---- geometry -----------------------------------------------------------------------------------
    function count(name) {
      if (name === "axial") return info.slices;
      const shape = info.volume.shape_zyx;
      return name === "coronal" ? shape[1] : shape[2];
    }
    function transform(img) {
      const dpr = canvas.width / Math.max(1, canvas.clientWidth);
      const wmm = img.cols * img.colMm, hmm = img.rows * img.rowMm;
      const s = Math.min(canvas.width / wmm, canvas.height / hmm) * view.zoom; // device px per mm
      return { sx: img.colMm * s, sy: img.rowMm * s, dpr,
               x0: (canvas.width - wmm * s) / 2 + view.panX * dpr, y0: (canvas.height - hmm * s) / 2 + view.panY * dpr };
    }
    function toImage(e, img) {
      const r = canvas.getBoundingClientRect(), t = transform(img);
      return [((e.clientX - r.left) * t.dpr - t.x0) / t.sx, ((e.clientY - r.top) * t.dpr - t.y0) / t.sy];
    }
    function nearestFrame(volumeIndex) {
      let best = 0;
      info.volume_index.forEach((v, k) => { if (Math.abs(v - volumeIndex) < Math.abs(info.volume_index[best] - volumeIndex)) best = k; });
      return best;
    }
    function axialRow(img) {
      // the row of a reformatted plane where the shown axial slice lies (head at the top)
      const z = info.volume_index[view.index.axial], nz = info.volume.shape_zyx[0];
      return info.volume.superior_first ? z : nz - 1 - z;
    }

    // ---- drawing ------------------------------------------------------------------------------------
    function request() { if (!pending) { pending = true; requestAnimationFrame(render); } }
    function windowInto(img) {
      if (buf.width !== img.cols || buf.height !== img.rows) { buf.width = img.cols; buf.height = img.rows; }
      const data = bctx.createImageData(img.cols, img.rows), px = new Uint32Array(data.data.buffer), hu = img.hu;
      const lo = view.level - view.width / 2, scale = 255 / Math.max(1, view.width), lut = new Uint32Array(256);
      for (let v = 0; v < 256; v++) lut[v] = 0xff000000 | (v << 16) | (v << 8) | v;
      for (let i = 0; i < hu.length; i++) {
        const v = (hu[i] - lo) * scale;
        px[i] = lut[v <= 0 ? 0 : v >= 255 ? 255 : v | 0];
      }
      bctx.putImageData(data, 0, 0);
    }
    function fitCanvas() {
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(1, Math.round(stage.clientWidth * dpr)), h = Math.max(1, Math.round(stage.clientHeight * dpr));
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    }
    function render() {
      pending = false;
      const img = current;
      if (!img) return;
      fitCanvas();
      const key = [img.plane, img.k, view.level, view.width].join(":");
      if (bufKey !== key) { windowInto(img); bufKey = key; }
      const t = transform(img);
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = view.zoom < 3;
      ctx.drawImage(buf, t.x0, t.y0, img.cols * t.sx, img.rows * t.sy);
      const shownOverlay = drawOverlay(img, t);
      drawPositions(img, t);
      drawMeasurements(img, t);
      stage.dataset.plane = img.plane;
      stage.dataset.slice = String(img.k);
      stage.dataset.window = view.preset || "custom";
      stage.dataset.ww = String(Math.round(view.width)); stage.dataset.wc = String(Math.round(view.level));
      stage.dataset.zoom = view.zoom.toFixed(3);
      stage.dataset.overlay = shownOverlay;
      stage.dataset.imageSize = img.cols + "x" + img.rows;
      stage.dataset.displaySize = Math.round(img.cols * t.sx / t.dpr) + "x" + Math.round(img.rows * t.sy / t.dpr);
      stage.dataset.drawn = String(++draws);
      out.ww.textContent = Math.round(view.width); out.wc.textContent = Math.round(view.level);
      out.zoom.textContent = Math.round(view.zoom * 100) + " %";
      label.textContent = (img.k + 1) + " / " + count(img.plane);
      stats.draws++; stats.seen.add(root.dataset.series + ":" + img.plane + ":" + img.k);
      if (stats.firstDrawMs === null) { stats.firstDrawMs = performance.now(); stage.dataset.firstDrawMs = stats.firstDrawMs.toFixed(1); }
    }
    function drawOverlay(img, t) {
      const model = modelSelect.value;
      if (!toggle.checked || !model) return "";
      const src = base + "/overlay/" + encodeURIComponent(model) + "/" + (img.plane === "axial" ? "" : img.plane + "/") + img.k + ".png";
      if (overlayImg.dataset.want !== src) { overlayImg.dataset.want = src; overlayImg.src = src; return ""; }
      if (overlayImg.dataset.loaded !== src) return "";
      ctx.save();
      ctx.globalAlpha = opacity.value / 100; ctx.globalCompositeOperation = "screen";
      ctx.drawImage(overlayImg, t.x0, t.y0, img.cols * t.sx, img.rows * t.sy);
      ctx.restore();
      return model;
    }
    function drawPositions(img, t) {
      if (!info.volume) return;
      ctx.save();
      ctx.strokeStyle = "rgba(255, 200, 0, 0.55)"; ctx.lineWidth = t.dpr; ctx.setLineDash([6 * t.dpr, 6 * t.dpr]);
      ctx.beginPath();
      if (img.plane === "axial") {
        const [, ny, nx] = info.volume.shape_zyx;
        const x = t.x0 + (view.index.sagittal + 0.5) * img.cols / nx * t.sx, y = t.y0 + (view.index.coronal + 0.5) * img.rows / ny * t.sy;
        ctx.moveTo(x, t.y0); ctx.lineTo(x, t.y0 + img.rows * t.sy);
        ctx.moveTo(t.x0, y); ctx.lineTo(t.x0 + img.cols * t.sx, y);
      } else {
        const y = t.y0 + (axialRow(img) + 0.5) * t.sy;
        ctx.moveTo(t.x0, y); ctx.lineTo(t.x0 + img.cols * t.sx, y);
      }
      ctx.stroke();
      ctx.restore();
    }
    function drawMeasurements(img, t) {
      const list = measurements.filter((m) => m.plane === img.plane && m.k === img.k);
      if (drag && drag.measure) list.push(drag.measure);
      ctx.save();
      ctx.lineWidth = 2 * t.dpr; ctx.strokeStyle = "#3cf"; ctx.fillStyle = "#3cf";
      ctx.font = (13 * t.dpr) + "px system-ui, sans-serif"; ctx.textBaseline = "bottom";
      list.forEach((m) => {
        const ax = t.x0 + m.a[0] * t.sx, ay = t.y0 + m.a[1] * t.sy, bx = t.x0 + m.b[0] * t.sx, by = t.y0 + m.b[1] * t.sy;
        ctx.beginPath();
        if (m.kind === "distance") { ctx.moveTo(ax, ay); ctx.lineTo(bx, by); }
        else ctx.ellipse((ax + bx) / 2, (ay + by) / 2, Math.abs(bx - ax) / 2, Math.abs(by - ay) / 2, 0, 0, 2 * Math.PI);
        ctx.stroke();
        if (!m.text) return;
        const x = Math.min(Math.max(ax, bx) + 4 * t.dpr, canvas.width - ctx.measureText(m.text).width - 4 * t.dpr);
        ctx.fillText(m.text, Math.max(4 * t.dpr, x), Math.max(16 * t.dpr, Math.min(ay, by)));
      });
      ctx.restore();
    }

    // ---- navigation ---------------------------------------------------------------------------------
    function go(n) {
      if (!info) return;
      const name = view.plane;
      const k = Math.max(0, Math.min(count(name) - 1, Math.round(n)));
      if (k !== view.index[name]) view.direction = k > view.index[name] ? 1 : -1;
      view.index[name] = k;
      slider.value = String(k);
      load(name, k).then((img) => {
        if (!img || view.plane !== name || view.index[name] !== k) return; // the user moved on meanwhile
        current = img; request();
        if (name === "axial") prefetch(k);
        else [k + 1, k - 1].forEach((n2) => n2 >= 0 && n2 < count(name) && loadPlane(name, n2).catch(() => {}));
      }).catch((e) => { label.textContent = e.message; });
    }
    function setPlane(name) {
      if (!info || (name !== "axial" && !info.volume)) return;
      view.plane = name;
      root.querySelectorAll("[data-plane]").forEach((b) => b.classList.toggle("active", b.dataset.plane === name));
      slider.max = String(count(name) - 1);
      view.zoom = 1; view.panX = view.panY = 0;
      go(view.index[name]);
    }
    function setWindow(name) {
      view.preset = name; [view.level, view.width] = WINDOWS[name];
      root.querySelectorAll("[data-window]").forEach((b) => b.classList.toggle("active", b.dataset.window === name));
      request();
    }
    function setTool(name) {
      view.tool = name; stage.dataset.tool = name;
      root.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === name));
    }
    function zoomAt(factor, e) {
      // keeps the point under the pointer (or the centre) where it is
      const r = canvas.getBoundingClientRect();
      const dx = e ? e.clientX - r.left - r.width / 2 : 0, dy = e ? e.clientY - r.top - r.height / 2 : 0;
      const zoom = Math.max(0.25, Math.min(16, view.zoom * factor)), f = zoom / view.zoom;
      view.panX = dx - (dx - view.panX) * f; view.panY = dy - (dy - view.panY) * f; view.zoom = zoom;
      request();
    }
    function resetView() {
      view.zoom = 1; view.panX = view.panY = 0;
      setWindow(view.preset || "lung");
    }
    function clearMeasurements() { measurements = []; measureList.replaceChildren(); request(); }
    function crossAt(e) {
      // double click: the other planes move to the point clicked
      const img = current;
      if (!img || !info.volume) return;
      const [x, y] = toImage(e, img), [nz, ny, nx] = info.volume.shape_zyx;
      if (img.plane === "axial") {
        view.index.coronal = Math.max(0, Math.min(ny - 1, Math.floor(y * ny / img.rows)));
        view.index.sagittal = Math.max(0, Math.min(nx - 1, Math.floor(x * nx / img.cols)));
      } else {
        const row = Math.max(0, Math.min(nz - 1, Math.floor(y)));
        view.index.axial = nearestFrame(info.volume.superior_first ? row : nz - 1 - row);
        view.index[img.plane === "coronal" ? "sagittal" : "coronal"] = Math.max(0, Math.floor(x));
      }
      request();
    }

    // ---- measurements -------------------------------------------------------------------------------
    function finishMeasure(m, img) {
      if (m.kind === "distance") {
        const mm = Math.hypot((m.b[0] - m.a[0]) * img.colMm, (m.b[1] - m.a[1]) * img.rowMm);
        if (mm < 0.5) return;
        m.values = { mm: number(mm, 1) };
        m.text = fill(root.dataset.labelDistance, m.values);
        m.data = { mm: mm.toFixed(3) };
      } else {
        const s = roiStats(img, m.a, m.b);
        if (!s) return;
        m.values = { mean: number(s.mean, 1), sd: number(s.sd, 1), min: number(s.min, 0), max: number(s.max, 0), area: number(s.area, 1) };
        m.text = fill(root.dataset.labelRoi, m.values);
        m.data = { mean: s.mean.toFixed(3), sd: s.sd.toFixed(3), min: String(s.min), max: String(s.max), area: s.area.toFixed(3), pixels: String(s.n) };
      }
      measurements.push(m);
      const li = document.createElement("li");
      li.textContent = m.text; li.dataset.kind = m.kind; li.dataset.plane = m.plane; li.dataset.k = String(m.k);
      Object.assign(li.dataset, m.data);
      measureList.append(li);
    }

    // ---- input --------------------------------------------------------------------------------------
    function pointerdown(e) {
      if (!current) return;
      stage.focus({ preventScroll: true });
      const mode = e.button === 2 ? "wl" : e.button === 1 ? "pan" : view.tool;
      drag = { mode, x: e.clientX, y: e.clientY, moved: 0 };
      if (mode === "distance" || mode === "roi") {
        const p = toImage(e, current);
        drag.measure = { kind: mode, plane: current.plane, k: current.k, a: p, b: p };
      }
      stage.setPointerCapture(e.pointerId);
      e.preventDefault();
    }
    function pointermove(e) {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (drag.mode === "scroll") {
        const steps = Math.trunc(dy / DRAG_PX_PER_SLICE);
        if (steps) { drag.y += steps * DRAG_PX_PER_SLICE; go(view.index[view.plane] + steps); }
        return;
      }
      drag.x = e.clientX; drag.y = e.clientY;
      if (drag.mode === "wl") {
        const f = Math.max(1, view.width / 300);
        view.width = Math.max(1, view.width + dx * 2 * f); view.level += dy * f; view.preset = "";
        root.querySelectorAll("[data-window]").forEach((b) => b.classList.remove("active"));
      } else if (drag.mode === "pan") { view.panX += dx; view.panY += dy; }
      else if (drag.mode === "zoom") zoomAt(Math.exp(-dy * 0.01));
      else drag.measure.b = toImage(e, current);
      request();
    }
    function pointerup() {
      if (drag && drag.measure && current) finishMeasure(drag.measure, current);
      drag = null; request();
    }
    function keydown(e) {
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
      if (key in MOVES) go(view.index[view.plane] + MOVES[key]);
      else if (key === "Home") go(0);
      else if (key === "End") go(count(view.plane) - 1);
      else if (PRESET_KEYS[key]) setWindow(PRESET_KEYS[key]);
      else if (TOOL_KEYS[key]) setTool(TOOL_KEYS[key]);
      else if (PLANE_KEYS[key]) setPlane(PLANE_KEYS[key]);
      else if (key === "+" || key === "=") zoomAt(ZOOM_STEP);
      else if (key === "-") zoomAt(1 / ZOOM_STEP);
      else if (key === "0") resetView();
      else if (key === "c") clearMeasurements();
      else if (key === "o") { toggle.checked = !toggle.checked; request(); }
      else if (key === "Escape") setTool("scroll");
      else return;
      e.preventDefault();
    }

    stage.addEventListener("wheel", (e) => {
      e.preventDefault();
      if (e.ctrlKey) zoomAt(Math.exp(-e.deltaY * 0.002), e);
      else go(view.index[view.plane] + (e.deltaY > 0 ? 1 : -1));
    }, { passive: false });
    stage.addEventListener("pointerdown", pointerdown);
    stage.addEventListener("pointermove", pointermove);
    stage.addEventListener("pointerup", pointerup);
    stage.addEventListener("pointercancel", pointerup);
    stage.addEventListener("contextmenu", (e) => e.preventDefault());
    stage.addEventListener("dblclick", crossAt);
    stage.addEventListener("keydown", keydown);
    slider.addEventListener("input", () => go(+slider.value));
    root.querySelectorAll("[data-window]").forEach((b) => b.addEventListener("click", () => setWindow(b.dataset.window)));
    root.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
    root.querySelectorAll("[data-plane]").forEach((b) => b.addEventListener("click", () => setPlane(b.dataset.plane)));
    root.querySelectorAll("[data-action]").forEach((b) => b.addEventListener("click", () => {
      ({ "zoom-in": () => zoomAt(ZOOM_STEP), "zoom-out": () => zoomAt(1 / ZOOM_STEP), reset: resetView,
         clear: clearMeasurements })[b.dataset.action]();
    }));
    toggle.addEventListener("change", request);
    modelSelect.addEventListener("change", request);
    opacity.addEventListener("input", request);
    overlayImg.addEventListener("load", () => { overlayImg.dataset.loaded = overlayImg.dataset.want; request(); });
    new ResizeObserver(request).observe(stage);

    function start(first) {
      fetch(base + "/viewer.json").then((r) => r.json()).then((doc) => {
        info = doc;
        doc.overlays.forEach((m) => modelSelect.append(new Option(m, m)));
        if (!doc.overlays.length) { toggle.disabled = true; opacity.disabled = true; modelSelect.hidden = true; }
        if (!doc.volume) root.querySelectorAll("[data-plane=coronal], [data-plane=sagittal]").forEach((b) => { b.disabled = true; });
        else { view.index.coronal = Math.floor(doc.volume.shape_zyx[1] / 2); view.index.sagittal = Math.floor(doc.volume.shape_zyx[2] / 2); }
        if (first && first.model && doc.overlays.includes(first.model)) modelSelect.value = first.model;
        view.index.axial = first ? nearestFrame(first.volumeIndex) : Math.floor(doc.slices / 2);
        setWindow(view.preset); setTool(view.tool); setPlane("axial");
        resolveReady();
      });
    }
    return {
      root, start, ready,
      jump(volumeIndex, model) {
        return ready.then(() => {
          if (model && info.overlays.includes(model)) { modelSelect.value = model; toggle.checked = true; }
          view.index.axial = nearestFrame(volumeIndex);
          if (view.plane !== "axial") setPlane("axial"); else go(view.index.axial);
          stage.focus({ preventScroll: true });
        });
      },
    };
  }

  // ---- the page: one viewer per analysed series, one shown at a time --------------------------------
  const viewers = new Map();
  const started = new Set();
  function target(el) {
    return { volumeIndex: +el.dataset.slice, model: el.dataset.model || (el.closest("[data-model]") || el).dataset.model };
  }
  function firstTarget(uid) {
    const marks = [...document.querySelectorAll("[data-slice][data-series]")]
      .filter((el) => el.dataset.series === uid && el.dataset.slice !== "" && !el.closest("[data-viewer]"));
    const flagged = marks.find((el) => el.closest(".flagged"));
    return flagged || marks[0] ? target(flagged || marks[0]) : null;
  }
  function show(uid, first) {
    const v = viewers.get(uid);
    if (!v) return null;
    viewers.forEach((other, id) => { other.root.hidden = id !== uid; });
    document.querySelectorAll("[data-show-series]").forEach((b) => b.classList.toggle("active", b.dataset.showSeries === uid));
    if (!started.has(uid)) { started.add(uid); v.start(first === undefined ? firstTarget(uid) : first); }
    return v;
  }
  document.querySelectorAll("[data-viewer]").forEach((root) => viewers.set(root.dataset.series, Viewer(root)));
  document.addEventListener("click", (e) => {
    const button = e.target.closest("[data-show-series]");
    if (button) { show(button.dataset.showSeries); return; }
    const el = e.target.closest("[data-slice][data-series]");
    if (!el || el.dataset.slice === "" || el.closest("[data-viewer]")) return;
    const t = target(el), v = show(el.dataset.series, t);
    if (!v) return;
    v.jump(t.volumeIndex, t.model);
    v.root.scrollIntoView({ block: "nearest" });
  });
  const firstViewer = document.querySelector("[data-viewer]");
  if (firstViewer) show(firstViewer.dataset.series);
})();
