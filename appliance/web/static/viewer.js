// Slice viewer: the stored images in stacking order, windowed in the browser from HU, with the
// model's overlay on top. Scroll, drag, slider or keys move through slices.
(function () {
  const WINDOWS = { lung: [-600, 1500], mediastinum: [50, 350], abdomen: [40, 400], bone: [400, 1800] };
  const KEYS = { l: "lung", m: "mediastinum", a: "abdomen", b: "bone" };
  const CACHE = 48;

  function Viewer(root) {
    const base = root.dataset.base;
    const stage = root.querySelector(".viewer-stage");
    const canvas = root.querySelector("[data-canvas]");
    const overlay = root.querySelector("[data-overlay]");
    const slider = root.querySelector("[data-slice-slider]");
    const label = root.querySelector("[data-slice-label]");
    const toggle = root.querySelector("[data-overlay-toggle]");
    const opacity = root.querySelector("[data-overlay-opacity]");
    const modelSelect = root.querySelector("[data-overlay-model]");
    const ctx = canvas.getContext("2d");
    const cache = new Map();
    let info = null, k = 0, win = "lung", draws = 0;

    async function pixels(i) {
      if (cache.has(i)) return cache.get(i);
      const res = await fetch(base + "/slice/" + i);
      if (!res.ok) throw new Error("slice " + i + ": " + res.status);
      const data = { rows: +res.headers.get("X-Rows"), cols: +res.headers.get("X-Columns"),
                     hu: new Int16Array(await res.arrayBuffer()) };
      cache.set(i, data);
      if (cache.size > CACHE) cache.delete(cache.keys().next().value);
      return data;
    }

    async function draw() {
      const want = k, w = win;
      const px = await pixels(want);
      if (want !== k || w !== win) return; // the user moved on while this slice loaded
      if (canvas.width !== px.cols || canvas.height !== px.rows) { canvas.width = px.cols; canvas.height = px.rows; }
      const [level, width] = WINDOWS[win];
      const lo = level - width / 2, scale = 255 / width;
      const img = ctx.createImageData(px.cols, px.rows);
      const out = img.data, hu = px.hu;
      for (let i = 0, j = 0; i < hu.length; i++, j += 4) {
        let v = (hu[i] - lo) * scale;
        v = v < 0 ? 0 : v > 255 ? 255 : v;
        out[j] = out[j + 1] = out[j + 2] = v; out[j + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      stage.dataset.slice = String(want);
      stage.dataset.window = win;
      stage.dataset.drawn = String(++draws);
      label.textContent = (want + 1) + " / " + info.slices;
      const model = modelSelect.value;
      overlay.hidden = !toggle.checked || !model;
      if (model) overlay.src = base + "/overlay/" + encodeURIComponent(model) + "/" + want + ".png";
      [want + 1, want - 1].forEach((n) => n >= 0 && n < info.slices && pixels(n).catch(() => {}));
    }

    function go(n) {
      if (!info) return;
      k = Math.max(0, Math.min(info.slices - 1, n));
      slider.value = String(k);
      draw().catch((e) => { label.textContent = e.message; });
    }
    function setWindow(name) {
      win = name;
      root.querySelectorAll("[data-window]").forEach((b) => b.classList.toggle("active", b.dataset.window === win));
      go(k);
    }
    root.go = go;

    stage.addEventListener("wheel", (e) => { e.preventDefault(); go(k + (e.deltaY > 0 ? 1 : -1)); }, { passive: false });
    let dragY = null;
    stage.addEventListener("pointerdown", (e) => { dragY = e.clientY; stage.setPointerCapture(e.pointerId); stage.focus(); });
    stage.addEventListener("pointermove", (e) => {
      if (dragY === null) return;
      const steps = Math.trunc((e.clientY - dragY) / 4);
      if (steps) { dragY += steps * 4; go(k + steps); }
    });
    stage.addEventListener("pointerup", () => { dragY = null; });
    stage.addEventListener("keydown", (e) => {
      const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: 10, PageUp: -10 };
      if (e.key in moves) { go(k + moves[e.key]); e.preventDefault(); }
      else if (e.key === "Home") go(0);
      else if (e.key === "End") go(info.slices - 1);
      else if (KEYS[e.key.toLowerCase()]) setWindow(KEYS[e.key.toLowerCase()]);
      else if (e.key.toLowerCase() === "o") { toggle.checked = !toggle.checked; go(k); }
    });
    slider.addEventListener("input", () => go(+slider.value));
    root.querySelectorAll("[data-window]").forEach((b) => b.addEventListener("click", () => setWindow(b.dataset.window)));
    toggle.addEventListener("change", () => go(k));
    modelSelect.addEventListener("change", () => go(k));
    opacity.addEventListener("input", () => { overlay.style.opacity = String(opacity.value / 100); });
    overlay.style.opacity = String(opacity.value / 100);

    fetch(base + "/viewer.json").then((r) => r.json()).then((doc) => {
      info = doc;
      slider.max = String(Math.max(0, doc.slices - 1));
      doc.overlays.forEach((m) => modelSelect.append(new Option(m, m)));
      if (!doc.overlays.length) { toggle.disabled = true; opacity.disabled = true; modelSelect.hidden = true; }
      const key = root.closest("section").querySelector(".keys img[data-slice]");
      setWindow(win);
      go(key && key.dataset.slice !== "" ? +key.dataset.slice : Math.floor(doc.slices / 2));
    });
    root.closest("section").querySelectorAll(".keys img[data-slice]").forEach((img) => {
      img.addEventListener("click", () => { go(+img.dataset.slice); stage.focus(); });
    });
  }
  document.querySelectorAll("[data-viewer]").forEach(Viewer);
})();
