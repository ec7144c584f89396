// The admin's live conversation page: staff watch one end user's conversation, claim, release and
// hand back a hand-off, and reply. Frames are described in docs/protocol.md ("Staff channel").
// No build step and no framework; user text is only ever inserted with textContent.
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("live-config").textContent);
  const list = document.getElementById("live-messages");
  const statusLine = document.getElementById("live-status");
  const typingLine = document.getElementById("live-typing");
  const errorLine = document.getElementById("live-error");
  const escalationBox = document.getElementById("live-escalations");
  const form = document.getElementById("live-reply");
  const threadSelect = document.getElementById("live-reply-thread");
  const textarea = document.getElementById("live-reply-content");
  const sendButton = document.getElementById("live-reply-send");

  const ROLE_LABELS = { user: "User", assistant: "Assistant", human_agent: "Human agent", system: "System" };
  const TYPING_TIMEOUT_MS = 8000;
  const TYPING_SEND_EVERY_MS = 3000;
  const TYPING_IDLE_MS = 4000;

  let socket = null;
  let retryDelay = 1000;
  let stopped = false;
  let replyPending = false;
  let escalations = [];
  const typing = { user: null, assistant: null }; // timers that clear each indicator
  const streams = new Map(); // user message id -> {li, next seq, pending pieces}
  let typingSentAt = 0;
  let typingIdleTimer = null;

  // --- drawing ---------------------------------------------------------------------------------

  function scrollToEnd() {
    list.scrollTop = list.scrollHeight;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  // The console's one timestamp format (YYYY-MM-DD HH:MM), in the site's time zone (TIME_ZONE).
  const STAMP = new Intl.DateTimeFormat("en-CA", {
    timeZone: config.timeZone || "UTC", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", hourCycle: "h23",
  });

  function timeLabel(iso) {
    const date = iso ? new Date(iso) : new Date();
    if (isNaN(date)) return "";
    const part = {};
    STAMP.formatToParts(date).forEach(function (p) { part[p.type] = p.value; });
    return part.year + "-" + part.month + "-" + part.day + " " + part.hour + ":" + part.minute;
  }

  function messageItem(role, metaText, content) {
    const li = element("li", "role-" + role);
    li.appendChild(element("span", "meta", metaText));
    li.appendChild(element("span", "content", content));
    return li;
  }

  function append(li) {
    const empty = document.getElementById("live-empty");
    if (empty) empty.remove();
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(li);
    if (atEnd) scrollToEnd();
  }

  // A stored message (user_message, human_joined, human_message, bot_back): shown once, by id.
  function showMessage(message) {
    if (!message.id || list.querySelector('li[data-id="' + CSS.escape(message.id) + '"]')) return;
    const role = message.role || "system";
    const li = messageItem(role, timeLabel(message.created_at) + " · " + (ROLE_LABELS[role] || role), message.content || "");
    li.dataset.id = message.id;
    li.dataset.thread = message.thread_id || "";
    append(li);
  }

  function note(text) {
    append(element("li", "note", text));
  }

  // Streamed reply pieces, appended in seq order whatever order they arrive in.
  function showDelta(frame) {
    let stream = streams.get(frame.message_id);
    if (!stream) {
      const li = messageItem("assistant", timeLabel() + " · Assistant", "");
      li.classList.add("streaming");
      append(li);
      stream = { li: li, next: 0, pending: new Map() };
      streams.set(frame.message_id, stream);
    }
    stream.pending.set(frame.seq, frame.text || "");
    const content = stream.li.querySelector(".content");
    while (stream.pending.has(stream.next)) {
      content.textContent += stream.pending.get(stream.next);
      stream.pending.delete(stream.next);
      stream.next += 1;
    }
  }

  // The final reply replaces its streamed text (or appears, when it was not streamed).
  function showTurn(frame) {
    const stream = streams.get(frame.message_id);
    streams.delete(frame.message_id);
    if (!frame.content) {
      if (stream) stream.li.remove();
      return; // a held turn: the bot stays silent
    }
    if (frame.reply_id && list.querySelector('li[data-id="' + CSS.escape(frame.reply_id) + '"]')) {
      if (stream) stream.li.remove();
      return;
    }
    const li = stream ? stream.li : messageItem("assistant", timeLabel() + " · Assistant", "");
    li.classList.remove("streaming");
    li.querySelector(".content").textContent = frame.content;
    if (frame.reply_id) li.dataset.id = frame.reply_id;
    li.dataset.thread = frame.thread_id || "";
    if (!stream) append(li);
    setTyping("assistant", false);
  }

  function setTyping(role, state) {
    clearTimeout(typing[role]);
    typing[role] = state ? setTimeout(function () { setTyping(role, false); }, TYPING_TIMEOUT_MS) : null;
    const parts = [];
    if (typing.user) parts.push("The user is typing…");
    if (typing.assistant) parts.push("The assistant is writing a reply…");
    typingLine.textContent = parts.join(" ");
  }

  function showSeen(messageId) {
    list.querySelectorAll(".seen-marker").forEach(function (marker) { marker.remove(); });
    const li = messageId && list.querySelector('li[data-id="' + CSS.escape(messageId) + '"]');
    if (li) li.appendChild(element("span", "seen-marker", "✓ seen by the user"));
  }

  function button(label, type, escalationId, enabled) {
    const node = element("button", "button", label);
    node.type = "button";
    node.disabled = !enabled || !config.mayAct;
    node.addEventListener("click", function () {
      node.disabled = true;
      send({ type: type, escalation_id: escalationId });
    });
    return node;
  }

  function showEscalations(rows) {
    escalations = rows;
    const ul = element("ul");
    if (!rows.length) ul.appendChild(element("li", "", "No open escalation: the bot has this conversation."));
    rows.forEach(function (row) {
      const li = element("li");
      li.appendChild(element("strong", "", row.topic || "(no topic)"));
      const holder = row.status === "claimed" ? " by " + (row.held_by_me ? "you" : row.holder || "someone") : "";
      // Claimed: since the claim (how long it has been held); open: since it was opened.
      const since = row.status === "claimed" && row.claimed_at ? row.claimed_at : row.created_at;
      li.appendChild(element("div", "", row.status + holder + " · since " + timeLabel(since)));
      if (row.reason) li.appendChild(element("div", "help", row.reason));
      const actions = element("div");
      if (row.status === "open") actions.appendChild(button("Claim", "claim", row.id, true));
      if (row.status === "claimed") actions.appendChild(button("Release", "release", row.id, row.may_act));
      actions.appendChild(button("Hand back to the bot", "hand_back", row.id, row.may_act));
      li.appendChild(actions);
      ul.appendChild(li);
    });
    escalationBox.replaceChildren(ul);
    updateReplyBox();
  }

  // Staff may reply in the threads whose escalation they hold.
  function updateReplyBox() {
    const held = escalations.filter(function (row) { return row.held_by_me; });
    const chosen = threadSelect.value;
    threadSelect.replaceChildren();
    if (!held.length) threadSelect.appendChild(element("option", "", "Claim an escalation to reply"));
    held.forEach(function (row) {
      const option = element("option", "", row.topic || row.thread_id);
      option.value = row.thread_id;
      threadSelect.appendChild(option);
    });
    if (held.some(function (row) { return row.thread_id === chosen; })) threadSelect.value = chosen;
    const enabled = held.length > 0 && socket && socket.readyState === WebSocket.OPEN && !replyPending;
    threadSelect.disabled = textarea.disabled = sendButton.disabled = !enabled;
  }

  // --- the socket ------------------------------------------------------------------------------

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
  }

  function sendTyping(state) {
    clearTimeout(typingIdleTimer);
    if (state) {
      const now = Date.now();
      if (now - typingSentAt > TYPING_SEND_EVERY_MS) {
        typingSentAt = now;
        send({ type: "typing", state: true });
      }
      typingIdleTimer = setTimeout(function () { sendTyping(false); }, TYPING_IDLE_MS);
    } else if (typingSentAt) {
      typingSentAt = 0;
      send({ type: "typing", state: false });
    }
  }

  // Ask for what this page missed: since it was rendered, or while it was disconnected.
  function resume() {
    const stored = list.querySelectorAll("li[data-id]");
    const last = stored.length ? stored[stored.length - 1].dataset.id : null;
    send({ type: "resume", after: last });
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "ready":
        statusLine.textContent = "Live: watching " + frame.user_id + ".";
        retryDelay = 1000;
        resume();
        break;
      case "history":
        streams.forEach(function (stream) { stream.li.remove(); }); // their replies are in the history
        streams.clear();
        (frame.messages || []).forEach(showMessage);
        if (frame.complete === false && frame.messages && frame.messages.length) resume();
        break;
      case "escalations":
        showEscalations(frame.escalations || []);
        break;
      case "user_message":
      case "human_joined":
      case "human_message":
      case "bot_back":
        showMessage(frame);
        if (frame.type === "user_message") setTyping("user", false);
        break;
      case "typing":
        if (frame.role === "user" || frame.role === "assistant") setTyping(frame.role, frame.state === true);
        break;
      case "delta":
        setTyping("assistant", false);
        showDelta(frame);
        break;
      case "turn":
        showTurn(frame);
        break;
      case "thread":
        note("Thread " + (frame.event || "changed") + (frame.topic ? ": " + frame.topic : ""));
        break;
      case "seen":
        showSeen(frame.message_id);
        break;
      case "ack":
        if (frame.action === "reply") {
          replyPending = false;
          textarea.value = "";
          updateReplyBox();
          textarea.focus();
        }
        errorLine.textContent = "";
        break;
      case "error":
        errorLine.textContent = frame.message || frame.code;
        if (frame.action === "reply") {
          replyPending = false;
          updateReplyBox();
        }
        if (frame.action) showEscalations(escalations); // re-enable the buttons
        break;
      default:
        break; // frame types this page does not know are ignored (docs/protocol.md)
    }
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + config.wsPath);
    socket.addEventListener("message", function (event) {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      if (frame && typeof frame === "object") onFrame(frame);
    });
    socket.addEventListener("close", function (event) {
      replyPending = false;
      updateReplyBox();
      if (event.code === 4403 || event.code === 4404) {
        stopped = true;
        statusLine.textContent = "Not allowed to watch this conversation (log in to the admin again).";
        return;
      }
      if (stopped) return;
      const delay = retryDelay * (0.75 + Math.random() / 2);
      retryDelay = Math.min(retryDelay * 2, 30000);
      statusLine.textContent = "Disconnected; reconnecting in " + Math.round(delay / 1000) + " s…";
      setTimeout(connect, delay);
    });
  }

  // --- the reply box ---------------------------------------------------------------------------

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const content = textarea.value.trim();
    if (!content || replyPending || !threadSelect.value) return;
    replyPending = true;
    updateReplyBox();
    sendTyping(false);
    send({ type: "reply", thread_id: threadSelect.value, content: content });
  });

  textarea.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  textarea.addEventListener("input", function () {
    sendTyping(textarea.value.trim() !== "");
  });

  scrollToEnd();
  connect();
})();
