// Refreshes the live part of the page, answers the explain box, and sends actions.
// Everything shown comes from the server's templates (escaped there) or is set as text.
(function () {
  "use strict";
  const body = document.body;
  const given = parseFloat(body.dataset.interval);
  const interval = (Number.isFinite(given) ? Math.max(0.1, given) : 2) * 1000;
  const live = document.getElementById("live");
  const tagInput = document.getElementById("tag");

  let tag = tagInput.value.trim();  // the filter applied, not what is being typed

  function query() {
    return tag ? "?tag=" + encodeURIComponent(tag) : "";
  }

  // When Redis was last read (the server's clock), not when the browser last asked.
  function showTaken() {
    const marker = document.getElementById("taken");
    const taken = marker ? parseFloat(marker.dataset.taken) * 1000 : NaN;
    const out = document.getElementById("updated");
    if (!Number.isFinite(taken)) { out.textContent = ""; return; }
    const stale = Date.now() - taken > 3 * interval + 5000;
    out.textContent = (stale ? "STALE: " : "") + "read from Redis at " +
      new Date(taken).toLocaleTimeString();
  }

  async function refresh() {
    try {
      const response = await fetch("live" + query(), { cache: "no-store" });
      if (response.ok) {
        live.innerHTML = await response.text();
      }
      showTaken();
    } catch (err) {
      document.getElementById("updated").textContent = "dashboard unreachable";
    }
  }

  document.getElementById("tag-form").addEventListener("submit", function (event) {
    event.preventDefault();
    tag = tagInput.value.trim();
    history.replaceState(null, "", location.pathname + query());
    refresh();
  });

  document.getElementById("explain-form").addEventListener("submit", async function (event) {
    event.preventDefault();
    const out = document.getElementById("explain");
    const id = document.getElementById("task-id").value.trim();
    if (!id) { return; }
    const response = await fetch("api/explain?task_id=" + encodeURIComponent(id));
    const why = await response.json();
    out.hidden = false;
    out.textContent = why.error ? why.error : id + ": " + why.state + ". " + why.detail;
  });

  live.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-action]");
    if (!button || body.dataset.actions !== "on") { return; }
    const d = button.dataset;
    const payload = { queue: d.queue || null, key: d.key || null };
    let question;
    if (d.action === "release") {
      payload.task_id = d.taskId;
      payload.kind = d.kind;
      question = "Force-release " + d.taskId + " from " + (d.kind === "key" ? "key " + d.key : "queue " + d.queue) + "?";
    } else if (d.action === "limit") {
      const limit = prompt("New limit of queue " + d.queue + " (empty clears the recorded one):", d.limit);
      if (limit === null) { return; }
      payload.limit = limit.trim();
      question = "Set the limit of queue " + d.queue + " to " + (payload.limit || "its declared value") + "?";
    } else {
      question = d.action[0].toUpperCase() + d.action.slice(1) + " queue " + d.queue + "?";
    }
    if (!confirm(question)) { return; }
    const response = await fetch("api/actions/" + d.action, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Ckeys-Action": "1" },
      body: JSON.stringify(payload),
    });
    if (!response.ok) {
      let reason = String(response.status);
      try { reason = (await response.json()).error || reason; } catch (err) { /* not JSON */ }
      alert("Refused: " + reason);
    }
    refresh();
  });

  showTaken();
  setInterval(refresh, interval);
})();
