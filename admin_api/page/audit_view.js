// The audit log, for all tokens (#/audit) or for one (#/audit/<token id>), newest first, through `next_cursor`.
// Events hold names and ranges that admins typed: they are shown as text, never as markup.

import { api, ApiError } from "./api.js";
import { duration, fullDateTime, levelLabel, relativeTime, shortDateTime } from "./format.js";
import { knownNames } from "./tokens_view.js";

const PAGE_SIZE = 100;
const TOKEN_ID = /^[0-9A-Za-z]{1,64}$/;
const $ = (id) => document.getElementById(id);

const view = {
  title: $("audit-title"),
  lead: $("audit-lead"),
  caption: $("audit-caption"),
  all: $("audit-all"),
  body: $("audit-body"),
  table: $("audit-table"),
  empty: $("audit-empty"),
  error: $("audit-error"),
  moreWrap: $("audit-more-wrap"),
  more: $("audit-more"),
};

const state = { tokenId: null, items: [], cursor: null, generation: 0, visit: 0, actors: new Map() };

const ACTIONS = {
  "token.create": "Token created",
  "token.edit": "Token edited",
  "token.rotate": "Token rotated",
  "token.disable": "Token disabled",
  "token.enable": "Token enabled",
  "token.delete": "Token deleted",
  "token.end_grace": "Grace period ended",
  "admin_key.create": "Admin key created",
  "admin_key.delete": "Admin key deleted",
  "admin_auth.failure": "Admin sign-in refused",
};

const FIELD_NAMES = {
  name: "Name",
  access_level: "Access level",
  allowed_ip_ranges: "IP ranges",
  expires_at: "Expires",
};

function shown(field, value) {
  if (value === null || value === undefined) return field === "expires_at" ? "never" : "none";
  if (Array.isArray(value)) return value.length ? value.join(", ") : "any address";
  if (field === "expires_at") return shortDateTime(value);
  if (field === "access_level") return levelLabel(value);
  if (field === "name") return `“${value}”`;
  return String(value);
}

function details(event) {
  const d = event.details || {};
  switch (event.action) {
    case "token.create":
      return ["access_level", "allowed_ip_ranges", "expires_at"]
        .map((field) => `${FIELD_NAMES[field]}: ${shown(field, d[field])}`);
    case "token.edit":
      return Object.entries(d.changes || {}).map(
        ([field, change]) =>
          `${FIELD_NAMES[field] || field}: ${shown(field, change.from)} → ${shown(field, change.to)}`,
      );
    case "token.rotate":
      return [d.grace_seconds ? `The previous token worked for ${duration(d.grace_seconds)} more`
        : "The previous token stopped at once"];
    case "token.delete":
      return [`Name: ${shown("name", d.name)}`];
    case "token.end_grace":
      return ["The previous token stopped working"];
    case "admin_key.create":
      return [`${shown("name", d.name)}, role ${d.role}`];
    case "admin_auth.failure":
      return [`From ${d.source_ip ?? "an unknown address"}: ${d.method ?? ""} ${d.path ?? ""}`.trim()];
    default:
      return Object.entries(d).map(
        ([key, value]) => `${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`,
      );
  }
}

function learnNames(events) {
  for (const event of events) {
    const d = event.details || {};
    const name = d.name ?? d.changes?.name?.to;
    if (event.token_id && typeof name === "string" && !knownNames.has(event.token_id)) {
      knownNames.set(event.token_id, name);
    }
  }
}

function text(tag, className, content) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (content !== undefined) element.textContent = content;
  return element;
}

function cell(label, ...children) {
  const td = document.createElement("td");
  td.dataset.label = label; // the label a narrow screen shows beside the value, where rows become cards
  const value = document.createElement("div");
  value.className = "cell";
  value.append(...children);
  td.append(value);
  return td;
}

function row(event) {
  const tr = document.createElement("tr");
  const when = text("time", "", relativeTime(event.at));
  when.dateTime = event.at;
  when.title = fullDateTime(event.at);
  let token = text("span", "muted", "—");
  if (event.token_id) {
    token = text("a", "", knownNames.get(event.token_id) ?? event.token_id);
    token.href = `#/audit/${encodeURIComponent(event.token_id)}`;
  }
  const lines = text("ul", "details");
  for (const line of details(event)) lines.append(text("li", "", line));
  const action = text("span", `event event-${event.action.split(".").pop()}`, ACTIONS[event.action] ?? event.action);
  action.title = event.action;
  tr.append(
    cell("When", when, text("span", "sub", shortDateTime(event.at))),
    cell("Event", action),
    cell("Token", token),
    cell("By", text("span", event.actor === "anonymous" ? "muted" : "", state.actors.get(event.actor) ?? event.actor)),
    cell("Details", lines),
  );
  return tr;
}

function render() {
  view.body.replaceChildren(...state.items.map(row));
  view.table.hidden = state.items.length === 0;
  view.empty.hidden = state.items.length !== 0;
  view.empty.textContent = "No events yet.";
  view.moreWrap.hidden = state.cursor === null;
}

async function load({ more = false } = {}) {
  const generation = ++state.generation;
  view.more.disabled = true;
  try {
    const query = { limit: PAGE_SIZE, token_id: state.tokenId ?? undefined, cursor: more ? state.cursor : undefined };
    const page = await api.listAudit(query);
    if (generation !== state.generation) return;
    learnNames(page.items);
    state.items = more ? [...state.items, ...page.items] : page.items;
    state.cursor = page.next_cursor;
    view.error.hidden = true;
    render();
  } catch (failure) {
    if (generation !== state.generation) return;
    view.error.textContent = failure.message;
    view.error.hidden = false;
  } finally {
    view.more.disabled = false;
  }
}

async function describeToken(tokenId) {
  try {
    const token = await api.getToken(tokenId);
    knownNames.set(tokenId, token.name);
    return `Every change to “${token.name}” (${tokenId}), newest first.`;
  } catch (failure) {
    if (failure instanceof ApiError && failure.status === 404) {
      return `Token ${tokenId} no longer exists; its history is kept.`;
    }
    throw failure;
  }
}

// Admin key names for the "By" column; the signed-in key at least, all of them when the list can be read.
async function learnActors(session) {
  state.actors = new Map([[session.id, session.name]]);
  try {
    for (const key of (await api.listAdminKeys()).items) state.actors.set(key.id, key.name);
  } catch {
    // Names are a nicety: the ids still say who did what.
  }
}

export async function showAudit(tokenId, session) {
  const visit = ++state.visit;
  state.tokenId = tokenId && TOKEN_ID.test(tokenId) ? tokenId : null;
  state.items = [];
  state.cursor = null;
  await learnActors(session);
  if (visit !== state.visit) return;
  render();
  view.all.hidden = state.tokenId === null;
  view.title.textContent = "Audit log";
  view.caption.textContent = "Audit events";
  view.lead.textContent = "Every change made through the admin API, newest first.";
  if (!state.tokenId) {
    await load();
    return;
  }
  const [lead] = await Promise.all([describeToken(state.tokenId).catch((failure) => failure.message), load()]);
  if (visit !== state.visit) return;
  const name = knownNames.get(state.tokenId); // from the token, or from its events when it was deleted
  view.lead.textContent = lead;
  view.title.textContent = name ? `Audit log: ${name}` : "Audit log of one token";
  view.caption.textContent = `Audit events of ${name ?? state.tokenId}`;
}

view.more.addEventListener("click", () => load({ more: true }));
