// The chat page (/chat with `imgw serve --web`): log in as a user on a device, see contacts'
// presence, chat 1:1 and in groups, go offline and back. Everything goes through the SDK;
// the page keeps only what it shows. `?user=U&device=D` logs in at once.
import { Client, type ConnectionState, type Message, type PresenceStatus } from "../index.js";

interface WebConfig {
  ws_host: string | null;
  ws_port: number;
  ws_path: string;
  dev_auth: boolean;
}

interface Shown {
  from: string;
  body: string;
  mid?: number;
  cmid?: string;
  pending: boolean;
  failed?: string;
}

interface Conversation {
  kind: "user" | "group";
  id: string;
  messages: Shown[];
  unread: number;
}

/** Messages kept per conversation (the oldest go first). */
const MAX_SHOWN = 500;

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing from the page`);
  return el as T;
};

const conversations = new Map<string, Conversation>();
const presence = new Map<string, PresenceStatus>();
let current: string | null = null;
let client: Client | null = null;
let me = "";

function key(kind: "user" | "group", id: string): string {
  return `${kind}:${id}`;
}

function conversation(kind: "user" | "group", id: string): Conversation {
  const k = key(kind, id);
  let c = conversations.get(k);
  if (!c) {
    c = { kind, id, messages: [], unread: 0 };
    conversations.set(k, c);
  }
  return c;
}

function log(text: string): void {
  $("log").textContent = text;
}

function el(tag: string, props: { className?: string; text?: string } = {}): HTMLElement {
  const e = document.createElement(tag);
  if (props.className) e.className = props.className;
  if (props.text !== undefined) e.textContent = props.text;
  return e;
}

function renderLists(): void {
  for (const kind of ["user", "group"] as const) {
    const ul = $(kind === "user" ? "contacts" : "groups");
    ul.replaceChildren();
    for (const c of conversations.values()) {
      if (c.kind !== kind) continue;
      const li = el("li");
      li.dataset.testid = kind === "user" ? "contact" : "group";
      li.dataset.id = c.id;
      if (key(c.kind, c.id) === current) li.classList.add("active");
      if (kind === "user") {
        const status = presence.get(c.id) ?? "offline";
        const dot = el("span", { className: `dot ${status}` });
        dot.title = status;
        li.append(dot);
        li.dataset.status = status;
      } else {
        li.append(el("span", { text: "#" }));
      }
      li.append(el("span", { text: c.id }));
      if (c.unread > 0) li.append(el("span", { className: "unread", text: String(c.unread) }));
      li.onclick = () => select(c.kind, c.id);
      ul.append(li);
    }
  }
}

function renderMessages(): void {
  const ol = $("messages");
  ol.replaceChildren();
  const c = current ? conversations.get(current) : undefined;
  $("conv-title").textContent = c ? (c.kind === "group" ? `#${c.id}` : c.id) : "Pick a contact or a group";
  ($("text") as HTMLInputElement).disabled = !c;
  if (!c) return;
  for (const m of c.messages) {
    const li = el("li");
    li.dataset.testid = "msg";
    if (m.mid !== undefined) li.dataset.mid = String(m.mid);
    if (m.from === me) li.classList.add("mine");
    if (m.pending) li.classList.add("pending");
    li.append(el("span", { className: "from", text: m.failed ? `${m.from} (not sent: ${m.failed})` : m.from }));
    li.append(el("span", { className: "body", text: m.body }));
    ol.append(li);
  }
  ol.scrollTop = ol.scrollHeight;
}

function select(kind: "user" | "group", id: string): void {
  const c = conversation(kind, id);
  current = key(kind, id);
  c.unread = 0;
  renderLists();
  renderMessages();
  ($("text") as HTMLInputElement).focus();
}

function push(c: Conversation, m: Shown): void {
  c.messages.push(m);
  if (c.messages.length > MAX_SHOWN) c.messages.splice(0, c.messages.length - MAX_SHOWN);
}

function onMessage(m: Message): void {
  const c = m.group !== undefined ? conversation("group", m.group) : conversation("user", m.peer ?? m.from);
  push(c, { from: m.from, body: m.body, mid: m.mid, pending: false });
  if (c.kind === "user" && !presence.has(c.id) && client) {
    presence.set(c.id, "offline");
    client.subscribePresence([c.id]).catch((e: Error) => log(e.message));
  }
  if (key(c.kind, c.id) === current) renderMessages();
  else c.unread++;
  renderLists();
}

function setState(s: ConnectionState): void {
  const badge = $("status");
  badge.className = `badge ${s}`;
  badge.dataset.state = s;
  badge.textContent = s === "closed" ? "offline" : s;
  const toggle = $("toggle");
  toggle.hidden = false;
  toggle.textContent = s === "closed" ? "Go online" : "Go offline";
}

async function send(text: string): Promise<void> {
  const c = current ? conversations.get(current) : undefined;
  if (!c || !client || text === "") return;
  const shown: Shown = { from: me, body: text, pending: true };
  push(c, shown);
  renderMessages();
  try {
    const ack = await client.send(c.kind === "group" ? { group: c.id } : { user: c.id }, text);
    shown.mid = ack.mid;
    shown.cmid = ack.cmid;
    shown.pending = false;
  } catch (e) {
    shown.failed = e instanceof Error ? e.message : String(e);
  }
  if (key(c.kind, c.id) === current) renderMessages();
}

function deviceId(): string {
  // Per tab (sessionStorage): a second tab is another device of the same user.
  let d = sessionStorage.getItem("imgw-device");
  if (!d) {
    const b = new Uint8Array(3);
    crypto.getRandomValues(b);
    d = `web-${Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("")}`;
    sessionStorage.setItem("imgw-device", d);
  }
  return d;
}

/** `?hello_in_url=1`: the `hello` goes in the WebSocket's URL (`helloInUrl`), so the gateway
 * answers the upgrade and `welcome` together. */
const helloInUrl = new URLSearchParams(location.search).get("hello_in_url") === "1";

async function login(cfg: WebConfig, user: string, device: string, token: string): Promise<void> {
  me = user;
  const host = cfg.ws_host ?? location.hostname;
  const url = `ws://${host}:${cfg.ws_port}${cfg.ws_path}`;
  client = new Client({ url, device, token: () => token || user, helloInUrl });
  client.on("state", setState);
  client.on("message", onMessage);
  client.on("presence", (p) => {
    presence.set(p.user, p.status);
    conversation("user", p.user);
    renderLists();
  });
  client.on("error", (e) => log(e.message));
  client.on("goaway", (g) => log(`goaway (${g.reason}): reconnecting in ${g.reconnectMs} ms`));
  $("me").textContent = `${user} on ${device}`;
  $("me").dataset.user = user;
  $("login").hidden = true;
  $("app").hidden = false;
  await client.connect();
  log(`connected to ${url}`);
}

async function main(): Promise<void> {
  const res = await fetch("/web/config.json");
  const cfg = (await res.json()) as WebConfig;
  $("auth-hint").textContent = cfg.dev_auth
    ? "This gateway runs with --insecure-dev-auth: the token is the user id (leave it empty)."
    : "Paste a JWT for this user (its sub is the user).";
  const params = new URLSearchParams(location.search);
  ($("device") as HTMLInputElement).value = params.get("device") ?? deviceId();
  $("login-form").onsubmit = (ev) => {
    ev.preventDefault();
    const user = ($("user") as HTMLInputElement).value.trim();
    const device = ($("device") as HTMLInputElement).value.trim() || deviceId();
    const token = ($("token") as HTMLInputElement).value.trim();
    if (user) login(cfg, user, device, token).catch((e: Error) => log(e.message));
  };
  $("add-contact").onsubmit = (ev) => {
    ev.preventDefault();
    const input = $("contact") as HTMLInputElement;
    const id = input.value.trim();
    if (!id || !client) return;
    input.value = "";
    if (!presence.has(id)) presence.set(id, "offline");
    select("user", id);
    client.subscribePresence([id]).catch((e: Error) => log(e.message));
  };
  $("join-group").onsubmit = (ev) => {
    ev.preventDefault();
    const input = $("group") as HTMLInputElement;
    const id = input.value.trim();
    if (!id || !client) return;
    input.value = "";
    client.joinGroup(id).then(
      () => select("group", id),
      (e: Error) => log(`join ${id}: ${e.message}`),
    );
  };
  $("compose").onsubmit = (ev) => {
    ev.preventDefault();
    const input = $("text") as HTMLInputElement;
    const text = input.value;
    input.value = "";
    void send(text);
  };
  ($("presence") as HTMLSelectElement).onchange = (ev) => {
    const status = (ev.target as HTMLSelectElement).value as Exclude<PresenceStatus, "offline">;
    client?.setPresence(status).catch((e: Error) => log(e.message));
  };
  $("toggle").onclick = () => {
    if (!client) return;
    if (client.state === "closed") client.connect().catch((e: Error) => log(e.message));
    else client.disconnect();
  };
  const user = params.get("user");
  if (user) await login(cfg, user, ($("device") as HTMLInputElement).value, params.get("token") ?? "");
}

main().catch((e: Error) => log(`start failed: ${e.message}`));
