/*!
 * AgentFlow chat widget. Plain JavaScript, no build step, no dependencies.
 *
 * Embed with one tag on any page:
 *
 *   <script src="https://agentflow.example/static/agentflow/widget.js"
 *           data-token-url="/chat-token" defer></script>
 *
 * data-token-url  (required) the host site's endpoint returning {"token": "..."} for the signed-in user
 * data-agent      the agent to chat with (its name): sent to the token endpoint as ?agent=<name>, whose
 *                 token is then bound to that agent; default: the endpoint's choice (the default agent)
 * data-server     the AgentFlow base URL (ws(s):// or http(s)://); default: where this script came from
 * data-title      the panel's title (default "Chat with us")
 * data-open       "true": open the panel on load
 * data-color      accent colour (any CSS colour)
 *
 * It speaks the WebSocket protocol of docs/protocol.md (version 1). Every piece of user, model and
 * staff text reaches the page through text nodes only: the markdown renderer builds DOM nodes and
 * never parses HTML.
 */
(function () {
  "use strict";

  if (window.AgentFlowWidget) return; // loaded twice: keep the first

  var PROTOCOL = 1;
  var BACKOFF_START_MS = 1000;
  var BACKOFF_MAX_MS = 30000;
  var PING_EVERY_MS = 25000;
  var SILENCE_LIMIT_MS = 60000;
  var TYPING_IDLE_MS = 3000;
  // While a sent message awaits its reply, ask for what was stored after it this often: a live event
  // lost on its way (the server restarting, Redis failing mid-turn) is then caught up.
  var CATCH_UP_MS = 15000;
  var STORE_PREFIX = "agentflow-widget:";

  // --- configuration from the script tag ----------------------------------------------------------

  var script =
    document.currentScript ||
    document.querySelector('script[src*="agentflow/widget.js"][data-token-url]') ||
    document.querySelector('script[src*="agentflow/widget.js"]');
  if (!script) return;
  var data = script.dataset || {};

  function wsBase(value) {
    var base = value ? new URL(value, window.location.href) : new URL(script.src, window.location.href);
    var scheme = base.protocol === "https:" || base.protocol === "wss:" ? "wss:" : "ws:";
    var path = value ? base.pathname.replace(/\/+$/, "") : "";
    return scheme + "//" + base.host + path;
  }

  var AGENT_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$/;
  if (data.agent && !AGENT_NAME.test(data.agent)) {
    console.error("AgentFlow widget: data-agent must be an agent's name (letters, digits, _ - .)");
    return;
  }

  function withAgent(url, agent) {
    if (!agent) return url;
    var target = new URL(url, window.location.href);
    target.searchParams.set("agent", agent);
    return target.href;
  }

  var config = {
    tokenUrl: withAgent(data.tokenUrl || "", data.agent),
    agent: data.agent || "",
    server: wsBase(data.server),
    title: (data.title || "Chat with us").slice(0, 100),
    open: data.open === "true" || data.open === "",
    color: data.color && window.CSS && CSS.supports && CSS.supports("color", data.color) ? data.color : null,
  };
  if (!data.tokenUrl) {
    console.error("AgentFlow widget: the script tag needs data-token-url");
    return;
  }

  // --- safe markdown ------------------------------------------------------------------------------
  // Text goes in through createTextNode only. Allowed: **bold**, *italic*, `code`, ``` blocks,
  // [links](http(s) only), bare http(s) URLs, line breaks, - and 1. lists. Anything else stays text.

  var FENCE = /^\s*```/;
  var BULLET = /^\s*[-*+]\s+/;
  var NUMBERED = /^\s*(\d{1,9})[.)]\s+/;
  var BLANK = /^\s*$/;
  var LINK = /\[([^\]\n]{1,500})\]\(([^()\s]{1,2000})\)/y;
  var BARE_URL = /https?:\/\/[^\s<>"'`]+/iy;

  function safeUrl(value) {
    try {
      var url = new URL(value);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function link(parent, href, label, depth) {
    var a = document.createElement("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    inline(a, label, depth + 1);
    parent.appendChild(a);
  }

  function inline(parent, text, depth) {
    var buffer = "";
    var i = 0;
    function flush() {
      if (buffer) parent.appendChild(document.createTextNode(buffer));
      buffer = "";
    }
    function wrap(tag, content) {
      flush();
      var node = document.createElement(tag);
      if (tag === "code") node.textContent = content;
      else inline(node, content, depth + 1);
      parent.appendChild(node);
    }
    while (i < text.length) {
      var ch = text[i];
      var end;
      if (ch === "\\" && i + 1 < text.length && "\\`*_[]()".indexOf(text[i + 1]) >= 0) {
        buffer += text[i + 1];
        i += 2;
        continue;
      }
      if (ch === "`" && (end = text.indexOf("`", i + 1)) > i + 1) {
        wrap("code", text.slice(i + 1, end));
        i = end + 1;
        continue;
      }
      if (depth < 6 && text.startsWith("**", i) && (end = text.indexOf("**", i + 2)) > i + 2) {
        wrap("strong", text.slice(i + 2, end));
        i = end + 2;
        continue;
      }
      if (depth < 6 && ch === "*" && text[i + 1] && !/[\s*]/.test(text[i + 1])) {
        end = text.indexOf("*", i + 1);
        if (end > i + 1 && !/\s/.test(text[end - 1])) {
          wrap("em", text.slice(i + 1, end));
          i = end + 1;
          continue;
        }
      }
      if (ch === "[" && depth < 6) {
        LINK.lastIndex = i;
        var m = LINK.exec(text);
        if (m) {
          var href = safeUrl(m[2]);
          if (href) {
            flush();
            link(parent, href, m[1], depth);
          } else {
            buffer += m[0]; // not http(s): shown as written, never as a link
          }
          i += m[0].length;
          continue;
        }
      }
      if ((ch === "h" || ch === "H") && (i === 0 || /[\s(]/.test(text[i - 1]))) {
        BARE_URL.lastIndex = i;
        var u = BARE_URL.exec(text);
        if (u) {
          var raw = u[0].replace(/[.,;:!?)\]]+$/, "");
          var bare = safeUrl(raw);
          if (bare) {
            flush();
            var a = document.createElement("a");
            a.href = bare;
            a.target = "_blank";
            a.rel = "noopener noreferrer nofollow";
            a.textContent = raw;
            parent.appendChild(a);
            i += raw.length;
            continue;
          }
        }
      }
      buffer += ch;
      i += 1;
    }
    flush();
  }

  function renderMarkdown(text) {
    var fragment = document.createDocumentFragment();
    var lines = String(text == null ? "" : text).replace(/\r\n?/g, "\n").split("\n");
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      if (FENCE.test(line)) {
        var code = [];
        i += 1;
        while (i < lines.length && !FENCE.test(lines[i])) code.push(lines[i++]);
        i += 1; // the closing fence (an unclosed block runs to the end)
        var pre = document.createElement("pre");
        var block = document.createElement("code");
        block.textContent = code.join("\n");
        pre.appendChild(block);
        fragment.appendChild(pre);
      } else if (BLANK.test(line)) {
        i += 1;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        var ordered = !BULLET.test(line);
        var marker = ordered ? NUMBERED : BULLET;
        var list = document.createElement(ordered ? "ol" : "ul");
        if (ordered) {
          var start = parseInt(NUMBERED.exec(line)[1], 10);
          if (start !== 1) list.start = start;
        }
        while (i < lines.length && marker.test(lines[i]) && (ordered || !NUMBERED.test(lines[i]))) {
          var item = document.createElement("li");
          inline(item, lines[i].replace(marker, ""), 0);
          list.appendChild(item);
          i += 1;
        }
        fragment.appendChild(list);
      } else {
        var paragraph = document.createElement("p");
        var first = true;
        while (
          i < lines.length &&
          !BLANK.test(lines[i]) &&
          !FENCE.test(lines[i]) &&
          !BULLET.test(lines[i]) &&
          !NUMBERED.test(lines[i])
        ) {
          if (!first) paragraph.appendChild(document.createElement("br"));
          inline(paragraph, lines[i], 0);
          first = false;
          i += 1;
        }
        fragment.appendChild(paragraph);
      }
    }
    return fragment;
  }

  function renderPlain(text) {
    var fragment = document.createDocumentFragment();
    String(text == null ? "" : text)
      .split("\n")
      .forEach(function (line, index) {
        if (index) fragment.appendChild(document.createElement("br"));
        fragment.appendChild(document.createTextNode(line));
      });
    return fragment;
  }

  // --- styles (inside a shadow root: the host page's CSS does not reach them) -------------------------

  var CSS_TEXT = [
    ":host{all:initial !important;display:block !important;position:static !important}",
    "*{box-sizing:border-box}",
    ".af-root{--af-accent:#2563eb;--af-accent-text:#fff;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#111827}",
    ".af-launcher{position:fixed;right:20px;bottom:20px;z-index:2147483000;width:56px;height:56px;border:0;border-radius:50%;",
    "background:var(--af-accent);color:var(--af-accent-text);cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25);display:flex;align-items:center;justify-content:center;padding:0}",
    ".af-launcher svg{width:26px;height:26px;fill:currentColor}",
    ".af-launcher:focus-visible,.af-close:focus-visible,.af-send:focus-visible,.af-retry:focus-visible{outline:3px solid #f59e0b;outline-offset:2px}",
    ".af-badge{position:absolute;top:-2px;right:-2px;min-width:20px;height:20px;border-radius:10px;background:#dc2626;color:#fff;font-size:12px;line-height:20px;padding:0 5px;text-align:center}",
    ".af-badge[hidden]{display:none}",
    ".af-panel{position:fixed;right:20px;bottom:88px;z-index:2147483001;width:380px;height:min(600px,calc(100vh - 110px));",
    "background:#fff;border-radius:14px;box-shadow:0 10px 40px rgba(0,0,0,.3);display:flex;flex-direction:column;overflow:hidden}",
    ".af-panel[hidden]{display:none}",
    ".af-header{display:flex;align-items:center;gap:8px;padding:12px 14px;background:var(--af-accent);color:var(--af-accent-text)}",
    ".af-title{flex:1;margin:0;font-size:16px;font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}",
    ".af-close{border:0;background:transparent;color:inherit;font-size:24px;line-height:1;width:36px;height:36px;border-radius:8px;cursor:pointer}",
    ".af-close:hover{background:rgba(255,255,255,.15)}",
    ".af-status{padding:4px 14px;font-size:12px;color:#6b7280;background:#f9fafb;min-height:0}",
    ".af-status:empty{display:none}",
    ".af-log{flex:1;overflow-y:auto;padding:12px 14px;display:flex;flex-direction:column;gap:8px;background:#f3f4f6;overscroll-behavior:contain}",
    ".af-log:focus-visible{outline:2px solid var(--af-accent);outline-offset:-2px}",
    ".af-msg{max-width:85%;padding:8px 12px;border-radius:14px;word-wrap:break-word;overflow-wrap:anywhere}",
    ".af-msg p{margin:0 0 6px}.af-msg p:last-child{margin-bottom:0}",
    ".af-msg ul,.af-msg ol{margin:4px 0;padding-left:22px}",
    ".af-msg pre{margin:6px 0;padding:8px;background:#111827;color:#f9fafb;border-radius:8px;overflow-x:auto;font-size:13px}",
    ".af-msg code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}",
    ".af-msg :not(pre)>code{background:rgba(0,0,0,.07);padding:1px 4px;border-radius:4px}",
    ".af-msg a{color:inherit;text-decoration:underline}",
    ".af-msg--user{align-self:flex-end;background:var(--af-accent);color:var(--af-accent-text);border-bottom-right-radius:4px}",
    ".af-msg--assistant{align-self:flex-start;background:#fff;border:1px solid #e5e7eb;border-bottom-left-radius:4px}",
    ".af-msg--human_agent{align-self:flex-start;background:#ecfdf5;border:1px solid #10b981;border-bottom-left-radius:4px}",
    ".af-msg--handoff{background:#fffbeb;border-color:#f59e0b}",
    ".af-who{display:block;font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;color:#047857;margin-bottom:2px}",
    ".af-note{align-self:center;max-width:90%;font-size:12px;color:#4b5563;background:#e5e7eb;border-radius:10px;padding:4px 10px;text-align:center}",
    ".af-note--error{background:#fee2e2;color:#991b1b}",
    ".af-state{display:block;font-size:11px;opacity:.8;margin-top:2px;text-align:right}",
    ".af-state:empty{display:none}",
    ".af-msg--failed{background:#fee2e2;color:#991b1b}",
    ".af-retry{margin-left:6px;border:1px solid currentColor;background:transparent;color:inherit;border-radius:6px;padding:1px 8px;font:inherit;cursor:pointer}",
    ".af-typing{padding:2px 16px 6px;font-size:12px;color:#6b7280;background:#f3f4f6;min-height:0}",
    ".af-typing[hidden]{display:none}",
    ".af-dots span{display:inline-block;width:6px;height:6px;margin-right:3px;border-radius:50%;background:#9ca3af;animation:af-blink 1.2s infinite}",
    ".af-dots span:nth-child(2){animation-delay:.2s}.af-dots span:nth-child(3){animation-delay:.4s}",
    "@keyframes af-blink{0%,80%,100%{opacity:.3}40%{opacity:1}}",
    ".af-form{display:flex;gap:8px;padding:10px;border-top:1px solid #e5e7eb;background:#fff}",
    ".af-input{flex:1;resize:none;border:1px solid #d1d5db;border-radius:10px;padding:8px 10px;font:inherit;color:inherit;background:#fff;max-height:120px;min-height:40px}",
    ".af-input:focus{outline:2px solid var(--af-accent);outline-offset:0;border-color:transparent}",
    ".af-send{border:0;border-radius:10px;padding:0 14px;background:var(--af-accent);color:var(--af-accent-text);font:inherit;font-weight:600;cursor:pointer;min-width:44px;min-height:40px}",
    ".af-send:disabled{opacity:.5;cursor:default}",
    ".af-sr{position:absolute;width:1px;height:1px;padding:0;margin:-1px;overflow:hidden;clip:rect(0,0,0,0);white-space:nowrap;border:0}",
    "@media (max-width:520px){",
    ".af-panel{inset:0;right:0;bottom:0;width:100%;height:100%;height:100dvh;border-radius:0}",
    ".af-root.af-open .af-launcher{display:none}",
    ".af-input{font-size:16px}", // below 16px, iOS zooms into the field
    "}",
    "@media (prefers-reduced-motion:reduce){.af-dots span{animation:none}}",
  ].join("\n");

  // --- DOM ----------------------------------------------------------------------------------------

  function el(tag, className, attrs) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        node.setAttribute(name, attrs[name]);
      });
    }
    return node;
  }

  var host = document.createElement("agentflow-chat");
  var shadow = host.attachShadow({ mode: "open" });
  if ("adoptedStyleSheets" in Document.prototype && window.CSSStyleSheet && CSSStyleSheet.prototype.replaceSync) {
    var sheet = new CSSStyleSheet(); // not an inline <style>: no CSP 'unsafe-inline' needed
    sheet.replaceSync(CSS_TEXT);
    shadow.adoptedStyleSheets = [sheet];
  } else {
    var style = document.createElement("style");
    style.textContent = CSS_TEXT;
    shadow.appendChild(style);
  }

  var root = el("div", "af-root");
  if (config.color) root.style.setProperty("--af-accent", config.color);

  var launcher = el("button", "af-launcher", {
    type: "button",
    "aria-haspopup": "dialog",
    "aria-expanded": "false",
    "aria-controls": "af-panel",
  });
  launcher.appendChild(
    (function () {
      var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", "0 0 24 24");
      svg.setAttribute("aria-hidden", "true");
      svg.setAttribute("focusable", "false");
      var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      path.setAttribute("d", "M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4H4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z");
      svg.appendChild(path);
      return svg;
    })()
  );
  var badge = el("span", "af-badge", { "aria-hidden": "true" });
  badge.hidden = true;
  launcher.appendChild(badge);

  var panel = el("div", "af-panel", { id: "af-panel", role: "dialog", "aria-label": config.title });
  panel.hidden = true;
  var header = el("div", "af-header");
  var title = el("h2", "af-title");
  title.textContent = config.title;
  var closeButton = el("button", "af-close", { type: "button", "aria-label": "Close chat" });
  closeButton.textContent = "\u00d7";
  header.appendChild(title);
  header.appendChild(closeButton);

  var status = el("div", "af-status", { role: "status" });
  var log = el("div", "af-log", {
    role: "log",
    "aria-live": "polite",
    "aria-relevant": "additions",
    "aria-label": "Messages",
    tabindex: "0",
  });
  var typing = el("div", "af-typing", { "aria-live": "polite" });
  typing.hidden = true;
  var typingLabel = el("span", "af-typing-label");
  var dots = el("span", "af-dots", { "aria-hidden": "true" });
  dots.appendChild(el("span"));
  dots.appendChild(el("span"));
  dots.appendChild(el("span"));
  typing.appendChild(dots);
  typing.appendChild(typingLabel);

  var form = el("form", "af-form");
  var inputLabel = el("label", "af-sr", { for: "af-input" });
  inputLabel.textContent = "Message";
  var input = el("textarea", "af-input", {
    id: "af-input",
    rows: "1",
    maxlength: "4000",
    placeholder: "Write a message\u2026",
    autocomplete: "off",
  });
  var sendButton = el("button", "af-send", { type: "submit", "aria-label": "Send message" });
  sendButton.textContent = "Send";
  form.appendChild(inputLabel);
  form.appendChild(input);
  form.appendChild(sendButton);

  panel.appendChild(header);
  panel.appendChild(status);
  panel.appendChild(log);
  panel.appendChild(typing);
  panel.appendChild(form);
  root.appendChild(panel);
  root.appendChild(launcher);
  shadow.appendChild(root);

  // --- state --------------------------------------------------------------------------------------

  var state = {
    open: false,
    started: false,
    stopped: false, // a configuration error (4403, 4400) or an erased user (4410): no reconnecting
    socket: null,
    ready: false,
    token: null,
    attempt: 0,
    reconnectTimer: null,
    pingTimer: null,
    lastFrameAt: 0,
    userId: null,
    lastId: null, // the newest stored message this page has
    unseenId: null, // the newest shown reply/staff message not yet acked
    unread: 0,
    pending: [], // [{cid, text}] sent but not acked: resent with the same client_message_id
    sent: {}, // cid -> text (for "retry" after an llm_error)
    typingSentAt: 0,
    typingTimer: null,
    catchUpTimer: null,
  };
  var byId = new Map(); // stored message id -> element
  var byCid = new Map(); // client_message_id -> the user's bubble
  var cidById = new Map(); // user message id -> client_message_id
  var replies = new Map(); // user message id -> {el, body, text, next, parts}
  var assistantTyping = new Set();
  var humanTyping = false;

  function storeKey() {
    return STORE_PREFIX + config.server + ":" + (config.agent ? config.agent + ":" : "") + state.userId;
  }
  function storePending() {
    if (!state.userId) return;
    try {
      if (state.pending.length) window.localStorage.setItem(storeKey(), JSON.stringify(state.pending));
      else window.localStorage.removeItem(storeKey());
    } catch (e) {
      /* storage unavailable (private mode): resending then only works within this page */
    }
  }
  function restorePending() {
    try {
      var saved = JSON.parse(window.localStorage.getItem(storeKey()) || "[]");
      return Array.isArray(saved) ? saved.filter(function (p) {
        return p && typeof p.cid === "string" && typeof p.text === "string";
      }) : [];
    } catch (e) {
      return [];
    }
  }

  function newCid() {
    var bytes = new Uint8Array(12);
    (window.crypto || window.msCrypto).getRandomValues(bytes);
    return "w-" + Array.prototype.map.call(bytes, function (b) {
      return ("0" + b.toString(16)).slice(-2);
    }).join("");
  }

  // --- rendering ----------------------------------------------------------------------------------

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }
  function scrollDown(force) {
    if (force || nearBottom()) log.scrollTop = log.scrollHeight;
  }

  /** The first of the user's bubbles not yet acked: history from the server goes before it. */
  function firstPendingBubble() {
    for (var i = 0; i < state.pending.length; i++) {
      var bubble = byCid.get(state.pending[i].cid);
      if (bubble && bubble.parentNode === log) return bubble;
    }
    return null;
  }

  function place(node, beforePending) {
    var stick = nearBottom();
    var anchor = beforePending ? firstPendingBubble() : null;
    if (anchor) log.insertBefore(node, anchor);
    else log.appendChild(node);
    scrollDown(stick);
  }

  function bubble(role, extraClass) {
    var node = el("div", "af-msg af-msg--" + role + (extraClass ? " " + extraClass : ""), { "data-role": role });
    if (role === "human_agent") {
      var who = el("span", "af-who");
      who.textContent = "Support team";
      node.appendChild(who);
    } else if (role === "assistant") {
      var label = el("span", "af-sr");
      label.textContent = "Assistant: ";
      node.appendChild(label);
    }
    var body = el("div", "af-body");
    node.appendChild(body);
    return { node: node, body: body };
  }

  function setBody(body, fragment) {
    while (body.firstChild) body.removeChild(body.firstChild);
    body.appendChild(fragment);
  }

  function userBubble(text, cid, id, beforePending) {
    var made = bubble("user");
    var label = el("span", "af-sr");
    label.textContent = "You: ";
    made.node.insertBefore(label, made.body);
    setBody(made.body, renderPlain(text));
    var stateLine = el("span", "af-state");
    made.node.appendChild(stateLine);
    if (cid) {
      made.node.setAttribute("data-cid", cid);
      byCid.set(cid, made.node);
    }
    if (id) remember(id, made.node);
    place(made.node, beforePending);
    return made.node;
  }

  function userState(cid, text) {
    var node = byCid.get(cid);
    if (!node) return;
    var line = node.querySelector(".af-state");
    line.textContent = text || "";
  }

  function remember(id, node) {
    node.setAttribute("data-id", id);
    byId.set(id, node);
  }

  function note(text, kind, id) {
    var node = el("div", "af-note" + (kind ? " af-note--" + kind : ""), { "data-role": "system" });
    node.textContent = text;
    if (id) remember(id, node);
    return node;
  }

  /** A reply or staff message is on screen: ack it now if the user can see it, else count it unread. */
  function seen(id, quiet) {
    state.unseenId = id;
    if (state.open && document.visibilityState === "visible") flushSeen();
    else if (!quiet) {
      state.unread += 1;
      badge.textContent = String(Math.min(state.unread, 99));
      badge.hidden = false;
      updateLauncherLabel();
    }
  }

  function flushSeen() {
    state.unread = 0;
    badge.hidden = true;
    updateLauncherLabel();
    if (state.unseenId && state.ready) {
      send({ type: "ack", message_id: state.unseenId });
      state.unseenId = null;
    }
  }

  function updateLauncherLabel() {
    var label = (state.open ? "Close chat" : "Open chat") + ": " + config.title;
    if (state.unread) label += " (" + state.unread + " unread)";
    launcher.setAttribute("aria-label", label);
  }

  function showTyping() {
    var who = humanTyping ? "A member of our team is typing" : "The assistant is typing";
    var visible = humanTyping || assistantTyping.size > 0;
    if (visible) typingLabel.textContent = " " + who + "\u2026";
    typing.hidden = !visible;
  }

  function setStatus(text) {
    status.textContent = text || "";
  }

  // A stored message from history, resume or a live frame.
  function showStored(m, beforePending) {
    if (!m || typeof m.id !== "string") return;
    state.lastId = m.id;
    if (byId.has(m.id)) return;
    if (m.role === "user") {
      var mine = m.client_message_id && byCid.get(m.client_message_id);
      if (mine) {
        remember(m.id, mine);
        cidById.set(m.id, m.client_message_id);
        return;
      }
      userBubble(m.content, m.client_message_id, m.id, beforePending);
      return;
    }
    if (m.role === "assistant") {
      if (m.reply_to && assistantTyping.delete(m.reply_to)) showTyping(); // its turn frame may never come
      if (m.reply_to && replies.has(m.reply_to)) {
        finishReply(m.reply_to, m.id, m.content, m.escalated);
      } else if (m.content) {
        var made = bubble("assistant", m.escalated ? "af-msg--handoff" : "");
        setBody(made.body, renderMarkdown(m.content));
        remember(m.id, made.node);
        place(made.node, beforePending);
      }
    } else if (m.role === "human_agent") {
      var staff = bubble("human_agent");
      setBody(staff.body, renderMarkdown(m.content));
      remember(m.id, staff.node);
      place(staff.node, beforePending);
    } else {
      place(note(m.content, "", m.id), beforePending);
    }
    seen(m.id, beforePending); // what history brings back is not counted as unread
  }

  // --- the streamed reply -------------------------------------------------------------------------

  function replyFor(messageId) {
    var reply = replies.get(messageId);
    if (!reply) {
      var made = bubble("assistant");
      made.node.setAttribute("aria-busy", "true"); // announced once, when complete
      made.node.setAttribute("data-streaming", "true");
      reply = { node: made.node, body: made.body, text: "", next: 0, parts: new Map() };
      replies.set(messageId, reply);
      place(made.node, false);
    }
    return reply;
  }

  function onDelta(frame) {
    if (typeof frame.message_id !== "string" || typeof frame.text !== "string") return;
    var reply = replyFor(frame.message_id);
    if (reply.done) return;
    var seq = typeof frame.seq === "number" ? frame.seq : reply.next;
    if (seq < reply.next) return; // a repeat
    reply.parts.set(seq, frame.text);
    while (reply.parts.has(reply.next)) {
      reply.text += reply.parts.get(reply.next);
      reply.parts.delete(reply.next);
      reply.next += 1;
    }
    var stick = nearBottom();
    setBody(reply.body, renderMarkdown(reply.text));
    scrollDown(stick);
    assistantTyping.delete(frame.message_id);
    showTyping();
  }

  function finishReply(messageId, replyId, content, escalated) {
    var reply = replies.get(messageId);
    if (replyId && byId.has(replyId) && (!reply || byId.get(replyId) === reply.node)) return; // shown already
    if (!reply) reply = replyFor(messageId);
    reply.done = true;
    setBody(reply.body, renderMarkdown(content));
    reply.node.removeAttribute("data-streaming");
    reply.node.setAttribute("aria-busy", "false");
    if (escalated) reply.node.classList.add("af-msg--handoff");
    if (replyId) {
      remember(replyId, reply.node);
      state.lastId = replyId;
      seen(replyId);
    }
    scrollDown(false);
  }

  function onTurn(frame) {
    var messageId = frame.message_id;
    if (typeof messageId !== "string") return;
    assistantTyping.delete(messageId);
    showTyping();
    var cid = cidById.get(messageId);
    if (frame.status === "failed") {
      if (cid) userState(cid, "");
      return; // the error frame (llm_error) explains it
    }
    if (cid) userState(cid, "");
    if (typeof frame.content === "string" && frame.content) {
      finishReply(messageId, typeof frame.reply_id === "string" ? frame.reply_id : null, frame.content,
        !!frame.escalated && frame.handled_by === "handoff");
    } else {
      var reply = replies.get(messageId); // the bot stays silent (a human holds the conversation)
      if (reply && !reply.text && reply.node.parentNode) reply.node.parentNode.removeChild(reply.node);
      replies.delete(messageId);
    }
  }

  // --- sending ------------------------------------------------------------------------------------

  function send(frame) {
    if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return false;
    state.socket.send(JSON.stringify(frame));
    return true;
  }

  function sendPending(item) {
    if (state.ready) send({ type: "message", client_message_id: item.cid, message: item.text });
  }

  function submit(text) {
    text = text.replace(/\s+$/, "");
    if (!text.trim()) return;
    var item = { cid: newCid(), text: text };
    state.pending.push(item);
    state.sent[item.cid] = text;
    storePending();
    userBubble(text, item.cid, null, false);
    userState(item.cid, "Sending\u2026");
    stopTyping();
    if (!state.started) start();
    sendPending(item);
  }

  function acked(cid, messageId, duplicate) {
    if (typeof messageId === "string" && !duplicate && !replies.has(messageId)) {
      assistantTyping.add(messageId); // until the server's own typing/turn frames say otherwise
      showTyping();
      catchUpLater();
    }
    state.pending = state.pending.filter(function (p) {
      return p.cid !== cid;
    });
    storePending();
    if (typeof messageId === "string") {
      cidById.set(messageId, cid);
      var node = byCid.get(cid);
      if (node && !node.hasAttribute("data-id")) remember(messageId, node);
      state.lastId = messageId;
    }
    userState(cid, "");
  }

  /** While replies are awaited, every CATCH_UP_MS: resume after the oldest awaited message. */
  function catchUpLater() {
    if (state.catchUpTimer) return;
    state.catchUpTimer = setTimeout(function () {
      state.catchUpTimer = null;
      var oldest = assistantTyping.values().next().value;
      if (oldest === undefined) return;
      if (state.ready) send({ type: "resume", after: oldest });
      catchUpLater();
    }, CATCH_UP_MS);
  }

  function retryButton(cid, text) {
    var button = el("button", "af-retry", { type: "button" });
    button.textContent = "Retry";
    button.addEventListener("click", function () {
      var container = button.parentNode;
      if (container && container.parentNode) container.parentNode.removeChild(container);
      var item = { cid: cid, text: text };
      state.pending.push(item);
      storePending();
      userState(cid, "Sending\u2026");
      sendPending(item);
      input.focus();
    });
    return button;
  }

  function onError(frame) {
    var cid = typeof frame.client_message_id === "string" ? frame.client_message_id : null;
    switch (frame.code) {
      case "invalid_input":
        if (cid) {
          acked(cid, null);
          var node = byCid.get(cid);
          if (node) node.classList.add("af-msg--failed");
          userState(cid, "Not sent: " + (frame.message || "invalid message"));
        }
        break;
      case "rate_limited":
        if (cid) {
          userState(cid, "Waiting to send\u2026");
          var wait = Math.min(Math.max(Number(frame.retry_after) || 5, 1), 300) * 1000;
          setTimeout(function () {
            state.pending.forEach(function (p) {
              if (p.cid === cid) sendPending(p);
            });
          }, wait);
        }
        break;
      case "llm_error": {
        var messageId = frame.message_id;
        assistantTyping.delete(messageId);
        showTyping();
        var failedCid = cidById.get(messageId) || cid;
        var shown = note(frame.message || "The assistant is unavailable right now.", "error");
        if (failedCid && state.sent[failedCid] != null) shown.appendChild(retryButton(failedCid, state.sent[failedCid]));
        place(shown, false);
        break;
      }
      case "not_found":
        if (frame.field === "after") {
          state.lastId = null; // our position is gone (erased?): start from the latest messages
          send({ type: "resume", after: null });
        }
        break;
      default:
        break; // unauthorized/origin errors are followed by a close; others need no action here
    }
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "ready":
        onReady(frame);
        break;
      case "ack":
        if (typeof frame.client_message_id === "string") acked(frame.client_message_id, frame.message_id, frame.duplicate);
        break;
      case "user_message":
        showStored(Object.assign({}, frame, { role: "user" }), false);
        break;
      case "typing":
        if (frame.role === "human_agent") humanTyping = !!frame.state;
        else if (typeof frame.message_id === "string") {
          if (frame.state && !(replies.get(frame.message_id) || {}).done) assistantTyping.add(frame.message_id);
          else assistantTyping.delete(frame.message_id);
        }
        showTyping();
        break;
      case "delta":
        onDelta(frame);
        break;
      case "turn":
        onTurn(frame);
        break;
      case "human_joined":
      case "bot_back":
        showStored(Object.assign({ role: "system" }, frame), false);
        break;
      case "human_message":
        humanTyping = false;
        showTyping();
        showStored(Object.assign({ role: "human_agent" }, frame), false);
        break;
      case "history":
        if (Array.isArray(frame.messages)) {
          frame.messages.forEach(function (m) {
            showStored(m, true);
          });
          if (frame.complete === false && state.lastId) send({ type: "resume", after: state.lastId });
        }
        break;
      case "error":
        onError(frame);
        break;
      default:
        break; // pong, thread, and frame types of later protocol versions
    }
  }

  function onReady(frame) {
    state.ready = true;
    state.attempt = 0;
    setStatus("");
    if (typeof frame.user_id === "string" && frame.user_id !== state.userId) {
      state.userId = frame.user_id;
      restorePending().forEach(function (item) {
        if (byCid.has(item.cid)) return;
        state.pending.push(item);
        state.sent[item.cid] = item.text;
        userBubble(item.text, item.cid, null, false);
        userState(item.cid, "Sending\u2026");
      });
      storePending();
    }
    send({ type: "resume", after: state.lastId });
    state.pending.forEach(sendPending);
    if (state.open) flushSeen();
  }

  // --- typing -------------------------------------------------------------------------------------

  function onInput() {
    if (!input.value.trim()) return stopTyping();
    var now = Date.now();
    if (now - state.typingSentAt > TYPING_IDLE_MS && send({ type: "typing", state: true })) state.typingSentAt = now;
    clearTimeout(state.typingTimer);
    state.typingTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    clearTimeout(state.typingTimer);
    if (state.typingSentAt) {
      send({ type: "typing", state: false });
      state.typingSentAt = 0;
    }
  }

  // --- the connection -----------------------------------------------------------------------------

  function fetchToken() {
    return fetch(config.tokenUrl, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    }).then(function (response) {
      if (!response.ok) throw new Error("the token endpoint answered " + response.status);
      return response.json();
    }).then(function (body) {
      if (!body || typeof body.token !== "string" || !body.token) throw new Error("no token in the answer");
      return body;
    });
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (state.stopped || state.socket) return;
    setStatus(state.attempt ? "Reconnecting\u2026" : "Connecting\u2026");
    var path = "/ws/chat/";
    var tokenReady = state.token
      ? Promise.resolve(null)
      : fetchToken().then(function (body) {
          state.token = body.token;
          if (typeof body.websocket_path === "string" && /^\/[\w\/.-]*$/.test(body.websocket_path)) {
            path = body.websocket_path;
          }
        });
    tokenReady.then(
      function () {
        if (state.socket || state.stopped) return;
        openSocket(config.server + path + "?token=" + encodeURIComponent(state.token) + "&v=" + PROTOCOL);
      },
      function (error) {
        console.warn("AgentFlow widget: no chat token:", error && error.message);
        retryLater("Chat is unavailable right now.");
      }
    );
  }

  function openSocket(url) {
    var socket;
    try {
      socket = new WebSocket(url);
    } catch (e) {
      retryLater("Chat is unavailable right now.");
      return;
    }
    state.socket = socket;
    state.lastFrameAt = Date.now();
    socket.onmessage = function (event) {
      state.lastFrameAt = Date.now();
      if (typeof event.data !== "string") return;
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      if (frame && typeof frame === "object" && typeof frame.type === "string") onFrame(frame);
    };
    socket.onclose = function (event) {
      closed(socket, event.code);
    };
    clearInterval(state.pingTimer);
    state.pingTimer = setInterval(function () {
      if (state.socket !== socket) return;
      if (Date.now() - state.lastFrameAt > SILENCE_LIMIT_MS) {
        // A dead connection (a sleeping phone, a changed network) may never report a close.
        socket.onclose = null;
        socket.close();
        closed(socket, 1006);
      } else {
        send({ type: "ping" });
      }
    }, PING_EVERY_MS);
  }

  function closed(socket, code) {
    if (state.socket !== socket) return;
    state.socket = null;
    state.ready = false;
    clearInterval(state.pingTimer);
    assistantTyping.clear();
    humanTyping = false;
    showTyping();
    if (code === 4401) {
      state.token = null; // expired or refused: the next attempt fetches a new one
    } else if (code === 4403) {
      state.stopped = true;
      setStatus("Chat is not available on this site.");
      console.error("AgentFlow widget: this page's origin is not allowed (AGENTFLOW_WIDGET_ORIGINS)");
      return;
    } else if (code === 4410) {
      state.stopped = true; // the user's data was erased: this conversation is gone
      setStatus("This conversation has ended.");
      return;
    } else if (code === 4400) {
      state.stopped = true;
      setStatus("Chat is not available: the widget and the server disagree on the protocol version.");
      return;
    }
    retryLater("Connection lost. Reconnecting\u2026");
  }

  /** Exponential backoff with jitter: about 1 s, 2 s, 4 s ... up to 30 s. */
  function retryLater(message) {
    if (state.stopped || state.reconnectTimer) return;
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * Math.pow(2, state.attempt));
    var delay = Math.min(BACKOFF_MAX_MS, base * (0.75 + Math.random() * 0.5));
    state.attempt += 1;
    setStatus(message);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.started && !state.socket && !state.stopped) {
      state.attempt = 0;
      connect();
    }
  }

  function start() {
    if (state.started) return;
    state.started = true;
    connect();
  }

  // --- opening and closing ------------------------------------------------------------------------

  function openPanel() {
    state.open = true;
    panel.hidden = false;
    root.classList.add("af-open");
    launcher.setAttribute("aria-expanded", "true");
    updateLauncherLabel();
    start();
    flushSeen();
    scrollDown(true);
    input.focus();
  }

  function closePanel() {
    state.open = false;
    panel.hidden = true;
    root.classList.remove("af-open");
    launcher.setAttribute("aria-expanded", "false");
    updateLauncherLabel();
    stopTyping();
    launcher.focus();
  }

  launcher.addEventListener("click", function () {
    if (state.open) closePanel();
    else openPanel();
  });
  closeButton.addEventListener("click", closePanel);
  panel.addEventListener("keydown", function (event) {
    if (event.key === "Escape") {
      event.preventDefault();
      closePanel();
    }
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit(input.value);
    input.value = "";
    input.focus();
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit ? form.requestSubmit() : form.dispatchEvent(new Event("submit", { cancelable: true }));
    }
  });
  input.addEventListener("input", onInput);
  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState !== "visible") return;
    reconnectNow();
    if (state.open) flushSeen();
  });

  updateLauncherLabel();
  function mount() {
    document.body.appendChild(host);
    if (config.open) openPanel();
    else {
      // A conversation with messages still to send picks up again at once (their replies arrive while closed).
      try {
        for (var i = 0; i < window.localStorage.length; i++) {
          if (window.localStorage.key(i).indexOf(STORE_PREFIX + config.server + ":") === 0) {
            start();
            break;
          }
        }
      } catch (e) {
        /* no storage */
      }
    }
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);

  window.AgentFlowWidget = {
    open: openPanel,
    close: closePanel,
    renderMarkdown: renderMarkdown, // exposed for tests and for hosts that show transcripts
  };
})();
