// The analytics dashboard: fetches the figures (GET <data-url>?agent=&start=&end=) and draws them with
// Chart.js (vendored in vendor/chart.umd.min.js). The last figures and the charts stay reachable as
// window.agentflowDashboard = {data, charts} (the browser tests read them).
(function () {
  "use strict";

  const root = document.getElementById("analytics");
  if (!root) return;
  const form = document.getElementById("analytics-form");
  const status = document.getElementById("analytics-status");
  const errorBox = document.getElementById("analytics-error");
  const state = { data: null, charts: {}, loads: 0 };
  window.agentflowDashboard = state;

  const palette = ["#417690", "#e0a100", "#ba2121", "#5b8c5a", "#8e6cb0", "#d9712b", "#3c8dbc", "#999999",
    "#c45896", "#2f4f4f", "#79aec8", "#b5a642"];

  function text(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  function percent(rate) {
    return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + " %";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 90) return seconds.toFixed(0) + " s";
    if (seconds < 5400) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function draw(id, config) {
    if (state.charts[id]) state.charts[id].destroy();
    const canvas = document.getElementById(id);
    config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options);
    state.charts[id] = new window.Chart(canvas, config);
  }

  function figure(name, value) {
    root.querySelector('[data-figure="' + name + '"]').textContent = value;
  }

  function render(data) {
    const activity = data.activity;
    const outcomes = data.outcomes;
    const human = data.first_human_response;
    const latency = data.llm_latency;
    const tokens = data.tokens;

    figure("conversations", text(outcomes.conversations));
    figure("resolution_rate", percent(outcomes.resolution_rate));
    figure("escalation_rate", percent(outcomes.escalation_rate));
    figure("human_p50", duration(human.p50_seconds));
    figure("human_p95", duration(human.p95_seconds));
    figure("waiting", text(human.waiting));
    figure("llm_p50", latency.overall.p50_ms === null ? "–" : latency.overall.p50_ms + " ms");
    figure("llm_p95", latency.overall.p95_ms === null ? "–" : latency.overall.p95_ms + " ms");
    figure("cost", "$" + tokens.total_cost_usd.toFixed(4) +
      (tokens.unpriced_models.length ? " (no price: " + tokens.unpriced_models.join(", ") + ")" : ""));

    draw("chart-activity", {
      type: "bar",
      data: {
        labels: activity.days,
        datasets: [
          { type: "line", label: "messages", data: activity.messages, borderColor: palette[0],
            backgroundColor: palette[0], yAxisID: "y" },
          { label: "conversations", data: activity.conversations, backgroundColor: palette[1], yAxisID: "y" },
        ],
      },
      options: { scales: { y: { beginAtZero: true } } },
    });

    draw("chart-intents", {
      type: "doughnut",
      data: {
        labels: data.intents.map((row) => row.intent || "(none)"),
        datasets: [{ data: data.intents.map((row) => row.messages),
          backgroundColor: data.intents.map((row, i) => palette[i % palette.length]) }],
      },
      options: { plugins: { legend: { position: "right" } } },
    });

    draw("chart-outcomes", {
      type: "bar",
      data: {
        labels: ["opened", "resolved", "escalated"],
        datasets: [{ label: "conversations", data: [outcomes.conversations, outcomes.resolved, outcomes.escalated],
          backgroundColor: [palette[0], palette[3], palette[2]] }],
      },
      options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } },
    });

    draw("chart-reasons", {
      type: "bar",
      data: {
        labels: data.escalation_reasons.map((row) => row.reason || "(no reason)"),
        datasets: [{ label: "escalations", data: data.escalation_reasons.map((row) => row.escalations),
          backgroundColor: palette[2] }],
      },
      options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true } } },
    });

    draw("chart-latency", {
      type: "line",
      data: {
        labels: latency.days,
        datasets: [
          { label: "p50", data: latency.p50_ms, borderColor: palette[0], backgroundColor: palette[0], spanGaps: true },
          { label: "p95", data: latency.p95_ms, borderColor: palette[2], backgroundColor: palette[2], spanGaps: true },
        ],
      },
      options: { scales: { y: { beginAtZero: true } } },
    });

    draw("chart-tokens", {
      type: "bar",
      data: {
        labels: tokens.days,
        datasets: [
          { label: "input tokens", data: tokens.input_tokens, backgroundColor: palette[6], stack: "tokens", yAxisID: "y" },
          { label: "output tokens", data: tokens.output_tokens, backgroundColor: palette[4], stack: "tokens", yAxisID: "y" },
          { type: "line", label: "cost (USD)", data: tokens.cost_usd, borderColor: palette[5],
            backgroundColor: palette[5], yAxisID: "cost" },
        ],
      },
      options: {
        scales: {
          x: { stacked: true },
          y: { stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } },
          cost: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
            title: { display: true, text: "USD" } },
        },
      },
    });

    draw("chart-failures", {
      type: "bar",
      data: {
        labels: activity.days,
        datasets: [
          { label: "offline turns", data: activity.offline_turns, backgroundColor: palette[1] },
          { label: "failed turns", data: activity.failed_turns, backgroundColor: palette[2] },
        ],
      },
      options: { scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
    });

    const body = document.querySelector("#analytics-topics tbody");
    body.replaceChildren();
    if (!data.unresolved_topics.length) {
      const row = body.insertRow();
      const cell = row.insertCell();
      cell.colSpan = 4;
      cell.textContent = "No unresolved conversations in this range.";
    }
    for (const topic of data.unresolved_topics) {
      const row = body.insertRow();
      const cells = [topic.topic, topic.intent || "–", topic.conversations, topic.escalated];
      cells.forEach((value, i) => {
        const cell = row.insertCell();
        cell.textContent = String(value);
        if (i === 0) cell.className = "topic";
      });
    }
  }

  async function load() {
    const params = new URLSearchParams(new FormData(form));
    status.textContent = "Loading…";
    errorBox.textContent = "";
    try {
      const response = await fetch(root.dataset.url + "?" + params.toString(), {
        credentials: "same-origin", headers: { Accept: "application/json" },
      });
      const body = await response.json();
      if (!response.ok) {
        errorBox.textContent = (body.error && body.error.message) || "The figures could not be loaded.";
        status.textContent = "";
        return;
      }
      state.data = body;
      render(body);
      state.loads += 1;
      status.textContent = "";
      root.dataset.loaded = String(state.loads);
    } catch (error) {
      errorBox.textContent = "The figures could not be loaded: " + error;
      status.textContent = "";
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams(new FormData(form));
    history.replaceState(null, "", "?" + params.toString());
    load();
  });
  if (!errorBox.textContent) load();
  else status.textContent = "";
})();
