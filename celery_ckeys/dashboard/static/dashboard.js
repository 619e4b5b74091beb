// Refreshes the live part of the page, answers the explain box, and sends actions.
// Everything shown comes from the server's templates (escaped there) or is set as text.
(function () {
  "use strict";
  const body = document.body;
  const interval = Math.max(0.5, parseFloat(body.dataset.interval || "2")) * 1000;
  const live = document.getElementById("live");
  const tagInput = document.getElementById("tag");

  function query() {
    const tag = tagInput.value.trim();
    return tag ? "?tag=" + encodeURIComponent(tag) : "";
  }

  async function refresh() {
    try {
      const response = await fetch("live" + query(), { cache: "no-store" });
      if (response.ok) {
        live.innerHTML = await response.text();
        document.getElementById("updated").textContent =
          "updated " + new Date().toLocaleTimeString();
      }
    } catch (err) {
      document.getElementById("updated").textContent = "dashboard unreachable";
    }
  }

  document.getElementById("tag-form").addEventListener("submit", function (event) {
    event.preventDefault();
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
      const failed = await response.json();
      alert("Refused: " + (failed.error || response.status));
    }
    refresh();
  });

  setInterval(refresh, interval);
})();
