// Live progress: rows not yet done are refreshed every few seconds without reloading the page.
(function () {
  const table = document.querySelector("table.worklist");
  if (!table) return;
  const url = table.dataset.progressUrl;
  const label = JSON.parse(table.dataset.labels);
  function pending() {
    return [...table.querySelectorAll("tbody tr[data-study]")].filter((tr) => {
      const s = tr.querySelector("[data-status]");
      return s && (s.classList.contains("s-queued") || s.classList.contains("s-running"));
    });
  }
  function render(tr, info) {
    const badge = tr.querySelector("[data-status]");
    badge.className = "status s-" + info.status;
    let text = label[info.status] || info.status;
    if (info.status === "running") text += " " + Math.round((info.progress || 0) * 100) + "%";
    if (info.status === "failed" && info.error) text += ": " + info.error.slice(0, 80);
    if (info.status === "rejected" && info.reasons) text += ": " + info.reasons;
    badge.textContent = text;
    const flags = tr.querySelector("[data-flags]");
    flags.replaceChildren(...info.flags.map((f) => {
      const span = document.createElement("span");
      const rejected = f.flagged && f.review === "flag rejected";
      span.className = "flag " + (rejected ? "rejected" : f.flagged ? "on" : "off");
      span.dataset.review = f.review;
      span.title = f.model + (f.score === null ? "" : " " + f.score.toFixed(3)) +
        (rejected ? ": " + reviewWords("flag rejected", f.reviewers) : "");
      span.textContent = f.model + (f.flagged && !rejected ? " \u2691" : "") + (f.validated ? "" : "*");
      return span;
    }));
    tr.classList.toggle("flagged", info.flags.some((f) => f.flagged && f.review !== "flag rejected"));
    const review = tr.querySelector("[data-review-state]");
    if (review) {
      const state = info.review_state || "not flagged";
      review.dataset.reviewState = state;
      review.className = "review-badge rs-" + state.replace(/ /g, "-").replace(/,/g, "");
      review.textContent = reviewWords(state, info.reviewed_by);
    }
  }
  // the study's review state (store/reviews.py StudyReviewState) as the page's macro words it
  function reviewWords(state, reviewers) {
    return (label[state] || "").replace("{reviewer}", reviewers || "");
  }
  async function tick() {
    const rows = pending();
    if (rows.length) {
      const q = new URLSearchParams();
      rows.forEach((tr) => q.append("study", tr.dataset.study));
      try {
        const res = await fetch(url + "?" + q, { headers: { Accept: "application/json" } });
        if (res.ok) {
          const data = await res.json();
          rows.forEach((tr) => data[tr.dataset.study] && render(tr, data[tr.dataset.study]));
        }
      } catch (e) { /* the appliance restarting: try again next tick */ }
    }
    setTimeout(tick, 3000);
  }
  setTimeout(tick, 2000);
})();
