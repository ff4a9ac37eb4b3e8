// Upload: files, a folder or zip archives, sent in batches with progress; the last batch queues
// every series of the upload for analysis, so no series is analysed half-sent.
(function () {
  const zone = document.querySelector("[data-upload]");
  if (!zone) return;
  const bar = zone.querySelector("[data-progress]");
  const status = zone.querySelector("[data-upload-status]");
  const BATCH_FILES = 64, BATCH_BYTES = 128 * 1024 * 1024;

  function batches(files) {
    const out = [];
    let cur = [], size = 0;
    for (const f of files) {
      if (cur.length && (cur.length >= BATCH_FILES || size + f.size > BATCH_BYTES)) { out.push(cur); cur = []; size = 0; }
      cur.push(f); size += f.size;
    }
    if (cur.length) out.push(cur);
    return out;
  }

  function send(files, uploadId, final, onProgress) {
    return new Promise((resolve, reject) => {
      const form = new FormData();
      files.forEach((f) => form.append("files", f, f.name));
      if (uploadId) form.append("upload_id", uploadId);
      if (final) form.append("final", "1");
      const xhr = new XMLHttpRequest();
      xhr.open("POST", zone.dataset.url);
      xhr.setRequestHeader("X-CSRFToken", zone.dataset.csrf);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded);
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
        if (xhr.status === 200) resolve(body);
        else reject(new Error(body.message || xhr.status + " " + xhr.statusText));
      };
      xhr.onerror = () => reject(new Error(zone.dataset.msgNetwork));
      xhr.send(form);
    });
  }

  async function upload(files) {
    files = [...files].filter((f) => f.size > 0);
    if (!files.length) return;
    const total = files.reduce((n, f) => n + f.size, 0);
    if (total > +zone.dataset.maxBytes) {
      status.textContent = zone.dataset.msgError + ": " + zone.dataset.msgTooLarge;
      return;
    }
    const parts = batches(files);
    const sum = { stored: 0, duplicates: 0, quarantined: 0, series: 0 };
    let sent = 0, uploadId = null;
    bar.hidden = false; bar.value = 0;
    try {
      for (let i = 0; i < parts.length; i++) {
        const size = parts[i].reduce((n, f) => n + f.size, 0);
        status.textContent = zone.dataset.msgSending + " " + (i + 1) + " / " + parts.length;
        const res = await send(parts[i], uploadId, i === parts.length - 1,
                               (loaded) => { bar.value = (100 * (sent + loaded)) / total; });
        sent += size; bar.value = (100 * sent) / total;
        uploadId = res.upload_id;
        sum.stored += res.stored; sum.duplicates += res.duplicates; sum.quarantined += res.quarantined.length;
        if (i === parts.length - 1) sum.series = res.queued_series;
      }
      status.textContent = zone.dataset.msgDone.replace(/\{(\w+)\}/g, (m, k) => String(sum[k]));
      status.dataset.done = "1";
    } catch (e) {
      status.textContent = zone.dataset.msgError + ": " + e.message;
      status.dataset.done = "error";
    }
  }

  zone.querySelectorAll("input[type=file]").forEach((input) => input.addEventListener("change", () => upload(input.files)));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); upload(e.dataTransfer.files); });
})();
