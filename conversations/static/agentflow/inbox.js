// The hand-off inbox (admin/conversations/escalation/inbox/): live alerts for new escalations, the
// selected conversation kept up to date, replies over the staff WebSocket, canned replies and keys.
// Frames are described in docs/protocol.md ("Staff channel", "Staff inbox"). User text is only ever
// inserted with textContent. Without JavaScript the page still works: links and POST forms.
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("af-inbox-config").textContent);
  const rowsList = document.getElementById("af-rows");
  const liveLine = document.getElementById("af-live");
  const alertsButton = document.getElementById("af-alerts");
  const helpToggle = document.getElementById("af-help-toggle");
  const help = document.getElementById("af-help");
  const messages = document.getElementById("af-messages");
  const replyForm = document.getElementById("af-reply");
  const replyBox = document.getElementById("af-reply-content");
  const replyError = document.getElementById("af-reply-error");
  const ALERTS_KEY = "agentflow.inbox.alerts";
  const ROLE_LABELS = { user: "User", assistant: "Assistant", human_agent: "Human agent", system: "System" };

  // What the page did, for people debugging it and for the browser tests.
  const state = { alerts: 0, sounds: 0, notifications: [], queueReady: false, userReady: false };
  window.AgentFlowInbox = state;

  // --- time: the console's one format, in the site's time zone ----------------------------------
  const STAMP = new Intl.DateTimeFormat("en-CA", {
    timeZone: config.timeZone || "UTC", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", hourCycle: "h23",
  });
  function stamp(iso) {
    const date = iso ? new Date(iso) : new Date();
    if (isNaN(date)) return "";
    const part = {};
    STAMP.formatToParts(date).forEach(function (p) { part[p.type] = p.value; });
    return part.year + "-" + part.month + "-" + part.day + " " + part.hour + ":" + part.minute;
  }
  function ago(iso) {
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 60) return "just now";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
    return Math.floor(seconds / 86400) + " d";
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  // --- alerts: a WebAudio beep and a desktop notification, both off with one button -------------
  function alertsOn() {
    return localStorage.getItem(ALERTS_KEY) !== "off";
  }
  function drawAlertsButton() {
    alertsButton.textContent = alertsOn() ? "Alerts on" : "Alerts off";
    alertsButton.setAttribute("aria-pressed", alertsOn() ? "true" : "false");
  }
  alertsButton.addEventListener("click", function () {
    localStorage.setItem(ALERTS_KEY, alertsOn() ? "off" : "on");
    drawAlertsButton();
    if (alertsOn() && "Notification" in window && Notification.permission === "default") {
      Notification.requestPermission();
    }
    unlockAudio();
  });
  drawAlertsButton();

  let audio = null;
  function unlockAudio() {
    // Browsers start an AudioContext suspended until the page is used: resume it on the first input.
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return;
    if (!audio) audio = new Context();
    if (audio.state === "suspended") audio.resume();
  }
  document.addEventListener("keydown", unlockAudio, { once: true });
  document.addEventListener("pointerdown", unlockAudio, { once: true });

  function beep() {
    unlockAudio();
    if (!audio) return;
    const now = audio.currentTime;
    [880, 1320].forEach(function (frequency, i) {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.type = "sine";
      osc.frequency.value = frequency;
      gain.gain.setValueAtTime(0.0001, now + i * 0.18);
      gain.gain.exponentialRampToValueAtTime(0.25, now + i * 0.18 + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, now + i * 0.18 + 0.16);
      osc.connect(gain).connect(audio.destination);
      osc.start(now + i * 0.18);
      osc.stop(now + i * 0.18 + 0.17);
    });
    state.sounds += 1;
  }

  function notify(row) {
    if (!("Notification" in window) || Notification.permission !== "granted") return;
    const title = "New hand-off: " + row.user;
    const note = new Notification(title, { body: row.trigger || row.topic || row.reason, tag: "af-esc-" + row.id });
    note.onclick = function () { window.focus(); location.href = rowUrl(row.id); };
    state.notifications.push(title);
  }

  // --- the rows ---------------------------------------------------------------------------------
  function rowUrl(id) {
    return config.inboxUrl + "?" + (config.show !== "all" ? "show=" + encodeURIComponent(config.show) + "&" : "") + "e=" + id;
  }

  function rowItem(row) {
    const li = element("li", "af-row sla-" + row.sla);
    li.dataset.id = row.id;
    const link = element("a", "af-row-link");
    link.href = rowUrl(row.id);
    const head = element("span", "af-row-head");
    head.appendChild(element("strong", "af-row-user", row.user));
    head.appendChild(document.createTextNode(" "));
    head.appendChild(element("span", "af-quiet", row.agent));
    head.appendChild(document.createTextNode(" "));
    const label = row.mine ? "mine" : row.status === "claimed" ? row.holder : "open";
    head.appendChild(element("span", "af-badge status-" + row.status, label));
    const age = element("time", "af-age", ago(row.since));
    age.dateTime = row.since;
    age.title = stamp(row.since);
    head.appendChild(age);
    link.appendChild(head);
    link.appendChild(element("span", "af-row-trigger", (row.trigger || row.topic || "").slice(0, 140)));
    link.appendChild(element("span", "af-row-reason", (row.reason || "").slice(0, 120)));
    li.appendChild(link);
    return li;
  }

  function wanted(row) {
    if (config.show === "open") return row.status === "open";
    if (config.show === "mine") return row.mine;
    if (config.show === "waiting") return row.waiting;
    return row.status === "open" || row.mine || row.waiting;
  }

  function bumpCount(key, delta) {
    const node = document.querySelector('[data-count="' + key + '"]');
    if (node) node.textContent = String(Math.max(0, parseInt(node.textContent, 10) + delta));
  }

  function onOpened(row) {
    if (!row || rowsList.querySelector('li[data-id="' + row.id + '"]')) return;
    bumpCount("open", 1);
    if (wanted(row)) {
      const empty = document.getElementById("af-rows-empty");
      if (empty) empty.remove();
      const li = rowItem(row);
      li.classList.add("is-new");
      rowsList.appendChild(li); // oldest first: the newest waits least
    }
    state.alerts += 1;
    liveLine.textContent = "New hand-off from " + row.user + " (" + stamp(row.created_at) + ")";
    if (alertsOn()) {
      beep();
      notify(row);
    }
  }

  function onChanged(frame) {
    const existing = rowsList.querySelector('li[data-id="' + frame.escalation_id + '"]');
    const row = frame.escalation;
    if (existing) {
      if (row && wanted(row)) {
        const li = rowItem(row);
        if (existing.classList.contains("is-selected")) li.classList.add("is-selected");
        existing.replaceWith(li);
      } else {
        existing.remove();
      }
    }
    if (frame.escalation_id === config.selected) {
      liveLine.textContent = "This escalation is now " + frame.status + ": reload (Enter) to act on it.";
    }
  }

  // --- sockets (reconnecting) -------------------------------------------------------------------
  function connect(path, onFrame, onState) {
    let delay = 1000;
    let socket = null;
    function open() {
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      socket = new WebSocket(scheme + location.host + path);
      socket.onopen = function () { delay = 1000; };
      socket.onmessage = function (event) {
        let frame;
        try { frame = JSON.parse(event.data); } catch (e) { return; }
        onFrame(frame);
      };
      socket.onclose = function (event) {
        onState(false);
        if (event.code === 4403 || event.code === 4404) return; // not allowed, or gone: do not retry
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 30000);
      };
    }
    open();
    return { send: function (frame) {
      if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(frame)); return true; }
      return false;
    } };
  }

  connect(config.queuePath, function (frame) {
    if (frame.type === "ready") { state.queueReady = true; liveLine.textContent = "Live: new hand-offs appear here."; }
    else if (frame.type === "escalation_opened") onOpened(frame.escalation);
    else if (frame.type === "escalation_changed") onChanged(frame);
  }, function (up) {
    state.queueReady = up;
    if (!up) liveLine.textContent = "Reconnecting…";
  });

  // --- the selected conversation, live -----------------------------------------------------------
  function showMessage(message) {
    if (!messages || !message || message.thread_id !== config.threadId) return;
    if (message.id && messages.querySelector('li[data-id="' + CSS.escape(String(message.id)) + '"]')) return;
    const role = message.role || "system";
    const li = element("li", "af-msg role-" + role);
    if (message.id) li.dataset.id = message.id;
    let meta = stamp(message.created_at) + " · " + (ROLE_LABELS[role] || role);
    if (role === "user" && message.intent) meta += " · " + message.intent + (typeof message.confidence === "number" ? " " + message.confidence.toFixed(2) : "");
    li.appendChild(element("span", "af-meta", meta));
    li.appendChild(element("span", "af-content", message.content || ""));
    const empty = messages.querySelector(".af-empty");
    if (empty) empty.remove();
    messages.appendChild(li);
    messages.scrollTop = messages.scrollHeight;
  }

  let userSocket = null;
  let replyPending = false;
  if (config.userPath) {
    userSocket = connect(config.userPath, function (frame) {
      if (frame.type === "ready") { state.userReady = true; return; }
      if (["user_message", "human_joined", "human_message", "bot_back"].indexOf(frame.type) >= 0) showMessage(frame);
      else if (frame.type === "turn" && frame.reply_id) {
        showMessage({ id: frame.reply_id, thread_id: frame.thread_id, role: "assistant", content: frame.content, created_at: new Date().toISOString() });
      } else if (frame.type === "ack" && frame.action === "reply") {
        replyPending = false;
        replyBox.value = "";
        replyBox.disabled = false;
        replyBox.focus();
      } else if (frame.type === "error" && frame.action === "reply") {
        replyPending = false;
        replyBox.disabled = false;
        replyError.textContent = frame.message;
        replyError.hidden = false;
      }
    }, function (up) { state.userReady = up; });
    if (messages) messages.scrollTop = messages.scrollHeight;
  }

  // The reply goes over the staff socket (the live page's path); the form POST is the fallback.
  if (replyForm) {
    replyForm.addEventListener("submit", function (event) {
      const content = replyBox.value;
      if (!content.trim() || replyPending) { event.preventDefault(); return; }
      if (userSocket && state.userReady && userSocket.send({ type: "reply", thread_id: config.threadId, content: content })) {
        event.preventDefault();
        replyPending = true;
        replyBox.disabled = true;
        replyError.hidden = true;
      }
    });
    replyBox.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        replyForm.requestSubmit();
      }
    });
  }

  function insertCanned(button) {
    if (!replyBox || replyBox.disabled || !button || button.disabled) return;
    const body = button.dataset.body || "";
    const start = replyBox.selectionStart || 0;
    replyBox.value = replyBox.value.slice(0, start) + body + replyBox.value.slice(replyBox.selectionEnd || start);
    replyBox.focus();
    replyBox.selectionStart = replyBox.selectionEnd = start + body.length;
  }
  document.querySelectorAll(".af-canned-item").forEach(function (button) {
    button.addEventListener("click", function () { insertCanned(button); });
  });

  // --- keys --------------------------------------------------------------------------------------
  function rows() { return Array.prototype.slice.call(rowsList.querySelectorAll("li.af-row")); }
  let focused = rows().findIndex(function (li) { return li.classList.contains("is-selected"); });

  function focusRow(index) {
    const all = rows();
    if (!all.length) return;
    focused = Math.max(0, Math.min(all.length - 1, index));
    all.forEach(function (li, i) { li.classList.toggle("is-focused", i === focused); });
    all[focused].querySelector("a").focus();
  }

  function clickAction(action) {
    const button = document.querySelector('.af-actions button[data-action="' + action + '"]');
    if (button) button.click();
  }

  function toggleHelp() {
    help.hidden = !help.hidden;
    helpToggle.setAttribute("aria-expanded", help.hidden ? "false" : "true");
  }
  helpToggle.addEventListener("click", toggleHelp);

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const typing = event.target.closest && event.target.closest("textarea, input, select");
    if (typing) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const key = event.key;
    if (key === "j") focusRow(focused + 1);
    else if (key === "k") focusRow(focused < 0 ? 0 : focused - 1);
    else if (key === "o" || (key === "Enter" && !event.target.closest("a, button"))) {
      const all = rows();
      if (all[focused]) location.href = all[focused].querySelector("a").href;
      else location.reload();
    } else if (key === "c") clickAction("claim");
    else if (key === "u") clickAction("release");
    else if (key === "b") clickAction("hand_back");
    else if (key === "x") clickAction("resolve");
    else if (key === "r" && replyBox && !replyBox.disabled) replyBox.focus();
    else if (key === "?") toggleHelp();
    else if (/^[1-9]$/.test(key)) insertCanned(document.querySelectorAll(".af-canned-item")[parseInt(key, 10) - 1]);
    else return;
    event.preventDefault();
  });
})();
