// The API tokens overview: filters, the table (cards on a narrow screen), "Load more" through `next_cursor`,
// and each row's Actions menu: Edit, Rotate, Disable or Enable, Delete.

import { api } from "./api.js";
import { confirmAction, setUpDialog } from "./dialogs.js";
import {
  daysAgo, fullDateTime, isPast, levelLabel, plural, relativeTime, shortDate, shortDateTime,
} from "./format.js";
import { actionMenu } from "./menu.js";
import { openTokenForm, showToken } from "./token_form.js";
import { toast } from "./toast.js";
import { openUsage } from "./usage_view.js";

const PAGE_SIZE = 100;
const MAX_RANGES_SHOWN = 3;
const $ = (id) => document.getElementById(id);

const view = {
  body: $("tokens-body"),
  table: $("tokens-table"),
  empty: $("tokens-empty"),
  count: $("tokens-count"),
  error: $("tokens-error"),
  moreWrap: $("tokens-more-wrap"),
  more: $("tokens-more"),
  status: $("filter-status"),
  unused: $("filter-unused"),
  create: $("create-button"),
  viewerNotice: $("viewer-notice"),
  actionsHeader: $("actions-header"),
};

const confirmParts = {
  dialog: $("confirm-dialog"),
  form: $("confirm-form"),
  titleElement: $("confirm-title"),
  bodyElement: $("confirm-body"),
  button: $("confirm-button"),
  graceField: $("grace-field"),
  grace: $("grace"),
  error: $("confirm-error"),
};
setUpDialog(confirmParts.dialog);

const state = { items: [], cursor: null, canChange: false, filters: {}, generation: 0 };
const actionButtons = new Map(); // token id -> its Actions button in the current table
const usageButtons = new Map(); // token id -> its requests button (opens the usage chart)
export const knownNames = new Map(); // token id -> name, for the audit log

function filters() {
  const query = { limit: PAGE_SIZE };
  if (view.status.value) query.status = view.status.value;
  const days = view.unused.value.trim();
  view.unused.removeAttribute("aria-invalid");
  if (days !== "") {
    if (/^[0-9]{1,4}$/.test(days) && Number(days) >= 1) query.unused_since = daysAgo(Number(days));
    else view.unused.setAttribute("aria-invalid", "true");
  }
  return query;
}

function matchesFilters(token) {
  return !state.filters.status || token.status === state.filters.status;
}

function showError(message) {
  view.error.textContent = message;
  view.error.hidden = !message;
}

export async function loadTokens({ more = false } = {}) {
  const generation = ++state.generation; // a slower, older answer must not overwrite a newer one
  if (!more) state.filters = filters();
  const query = more ? { ...state.filters, cursor: state.cursor } : state.filters;
  view.more.disabled = true;
  try {
    const page = await api.listTokens(query);
    if (generation !== state.generation) return;
    state.items = more ? [...state.items, ...page.items] : page.items;
    state.cursor = page.next_cursor;
    showError("");
  } catch (failure) {
    if (generation === state.generation) showError(failure.message);
    return;
  } finally {
    view.more.disabled = false;
  }
  render();
}

export function setRole(canChange) {
  state.canChange = canChange;
  view.create.hidden = !canChange;
  view.viewerNotice.hidden = canChange;
  view.actionsHeader.hidden = !canChange;
}

function text(tag, className, content) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (content !== undefined) element.textContent = content;
  return element;
}

function timeElement(iso, content) {
  const element = text("time", "", content);
  element.dateTime = iso;
  element.title = fullDateTime(iso);
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

function statusBadge(token) {
  if (token.status === "disabled") return text("span", "badge badge-muted", "Disabled");
  if (isPast(token.expires_at)) return text("span", "badge badge-danger", "Expired");
  return text("span", "badge badge-success", "Enabled");
}

function rangesCell(ranges) {
  if (ranges.length === 0) return [text("span", "muted", "Any address")];
  const chips = text("span", "chips");
  for (const range of ranges.slice(0, MAX_RANGES_SHOWN)) chips.append(text("code", "chip", range));
  if (ranges.length > MAX_RANGES_SHOWN) {
    const rest = text("span", "chip chip-more", `+${ranges.length - MAX_RANGES_SHOWN} more`);
    rest.title = ranges.slice(MAX_RANGES_SHOWN).join("\n");
    chips.append(rest);
  }
  return [chips];
}

function lastUsedCell(token) {
  if (!token.last_used_at) return [text("span", "muted", "never")];
  const parts = [timeElement(token.last_used_at, relativeTime(token.last_used_at))];
  if (token.last_used_ip) parts.push(text("span", "sub", `from ${token.last_used_ip}`));
  return parts;
}

function requestsCell(token) {
  if (token.requests_24h === null || token.requests_24h === undefined) {
    return [text("span", "muted", "unknown")];
  }
  const button = text("button", "link-button", token.requests_24h.toLocaleString("en"));
  button.type = "button";
  button.setAttribute("aria-label", `Usage of ${token.name}: ${plural(token.requests_24h, "request")} in the last 24 hours`);
  button.title = "Show the usage chart";
  button.addEventListener("click", () => openUsage(token, () => usageButtons.get(token.id)));
  usageButtons.set(token.id, button);
  return [button];
}

function expiresCell(token) {
  if (!token.expires_at) return [text("span", "muted", "never")];
  const element = timeElement(token.expires_at, shortDate(token.expires_at));
  if (isPast(token.expires_at)) element.classList.add("text-danger");
  return [element, text("span", "sub", relativeTime(token.expires_at))];
}

function statusCell(token) {
  const parts = [statusBadge(token)];
  const previous = token.previous_secret_expires_at;
  if (previous && !isPast(previous)) {
    const note = text("span", "sub", `previous token works until ${shortDateTime(previous)}`);
    note.title = fullDateTime(previous);
    parts.push(note);
    if (token.previous_secret) parts.push(previousSecretNote(token.previous_secret));
  }
  return parts;
}

// Whether integrations still use the previous secret: once it is unused, the grace can end early.
function previousSecretNote(use) {
  if (!use.last_used_at) return text("span", "sub previous-use", "previous secret not used since the rotation");
  const where = use.last_used_ip ? ` from ${use.last_used_ip}` : "";
  const note = text(
    "span", "sub previous-use", `previous secret last used ${relativeTime(use.last_used_at)}${where}`,
  );
  note.title = `${plural(use.uses, "request")} with the previous secret since the rotation; last ` +
    fullDateTime(use.last_used_at);
  return note;
}

function inGrace(token) {
  return Boolean(token.previous_secret_expires_at) && !isPast(token.previous_secret_expires_at);
}

function nameCell(token) {
  const link = text("a", "token-name", token.name);
  link.href = `#/audit/${encodeURIComponent(token.id)}`;
  link.id = `token-name-${token.id}`;
  link.title = "Show the audit log of this token";
  return [link, text("span", "sub mono", token.id)];
}

// "100 / 60 s · 10000 / day" under the access level; nothing for a token without limits.
function limitsText(token) {
  const parts = [];
  const rate = token.rate_limit;
  if (rate) parts.push(`${rate.requests} / ${rate.per_seconds} s${rate.burst !== null ? ` (burst ${rate.burst})` : ""}`);
  const quota = token.quota;
  if (quota) parts.push(quota.period === "total" ? `${quota.requests} in total` : `${quota.requests} / ${quota.period}`);
  return parts.join(" · ");
}

function row(token) {
  const tr = document.createElement("tr");
  tr.dataset.tokenId = token.id;
  const level = text("span", "level", levelLabel(token.access_level));
  level.title = token.access_level;
  tr.append(
    cell("Name", ...nameCell(token)),
    cell("Access level", level, ...(limitsText(token) ? [text("span", "sub limits", limitsText(token))] : [])),
    cell("Allowed IP ranges", ...rangesCell(token.allowed_ip_ranges)),
    cell("Status", ...statusCell(token)),
    cell("Created", timeElement(token.created_at, shortDate(token.created_at))),
    cell("Last used", ...lastUsedCell(token)),
    cell("Requests (24 h)", ...requestsCell(token)),
    cell("Expires", ...expiresCell(token)),
  );
  if (state.canChange) {
    const menu = actionMenu(menuEntries(token), { describedBy: `token-name-${token.id}` });
    actionButtons.set(token.id, menu.button);
    const td = cell("", menu.element);
    td.className = "col-actions";
    tr.append(td);
  }
  return tr;
}

function render() {
  actionButtons.clear();
  usageButtons.clear();
  view.body.replaceChildren(...state.items.map(row));
  for (const token of state.items) knownNames.set(token.id, token.name);
  const filtered = Boolean(state.filters.status || state.filters.unused_since);
  view.table.hidden = state.items.length === 0;
  view.empty.hidden = state.items.length !== 0;
  view.empty.textContent = filtered
    ? "No tokens match these filters."
    : "No API tokens yet. Create one to let another system call the API through the gateway.";
  view.moreWrap.hidden = state.cursor === null;
  const shown = plural(state.items.length, "token");
  view.count.textContent = state.cursor === null ? shown : `${shown} shown; more are available`;
}

// Where focus goes after a dialog about `tokenId` closes: its Actions button, or a neighbour's when it is gone.
function focusAfter(tokenId) {
  return () => actionButtons.get(tokenId) ?? actionButtons.values().next().value ?? view.create;
}

// A record as listed: the token string of a create or rotate answer is shown once, never kept.
function listed(record) {
  const { token: _shownOnce, ...view } = record;
  return view;
}

// What only the list answers (usage); a change's answer is the token alone, so these are kept from before.
const LIST_ONLY = ["requests_24h"];

function replace(answer) {
  const record = listed(answer);
  const keep = (item) => Object.fromEntries(LIST_ONLY.filter((key) => key in item).map((key) => [key, item[key]]));
  state.items = state.items
    .map((item) => (item.id === record.id ? { ...keep(item), ...record } : item))
    .filter((item) => item.id !== record.id || matchesFilters(item));
  render();
}

function remove(tokenId) {
  state.items = state.items.filter((item) => item.id !== tokenId);
  render();
}

function menuEntries(token) {
  const name = `“${token.name}”`;
  const entries = [
    {
      label: "Edit",
      run: () => openTokenForm(token, {
        onSaved: (record) => {
          replace(record);
          toast(`Saved ${name.replace(token.name, record.name)}.`);
        },
        focusAfter: focusAfter(token.id),
      }),
    },
    {
      label: "Rotate",
      run: () => confirmAction(confirmParts, {
        title: `Rotate ${name}?`,
        body: "A new token is issued and shown once. Clients must switch to it; the current token stops " +
          "working at once, or after the grace period you choose.",
        confirmLabel: "Rotate",
        withGrace: true,
        run: ({ graceSeconds }) => api.rotateToken(token.id, graceSeconds),
        then: (record) => {
          replace(record);
          showToken(record.token, { heading: `New token for ${name}`, focusAfter: focusAfter(token.id) });
        },
        returnFocus: focusAfter(token.id),
      }),
    },
  ];
  if (inGrace(token)) {
    entries.push({
      label: "End grace period",
      run: () => confirmAction(confirmParts, {
        title: `End the grace period of ${name}?`,
        body: "The previous token stops working now; only the current one is accepted.",
        confirmLabel: "End grace period",
        danger: true,
        run: () => api.endGrace(token.id),
        then: (record) => {
          replace(record);
          toast(`The previous token of ${name} no longer works.`);
        },
        returnFocus: focusAfter(token.id),
      }),
    });
  }
  if (token.status === "enabled") {
    entries.push({
      label: "Disable",
      run: () => confirmAction(confirmParts, {
        title: `Disable ${name}?`,
        body: "Requests with this token are refused until it is enabled again. Nothing else changes.",
        confirmLabel: "Disable",
        danger: true,
        run: () => api.disableToken(token.id),
        then: (record) => {
          replace(record);
          toast(`${name} is disabled.`);
        },
        returnFocus: focusAfter(token.id),
      }),
    });
  } else {
    entries.push({
      label: "Enable",
      run: () => confirmAction(confirmParts, {
        title: `Enable ${name}?`,
        body: "Requests with this token are accepted again, within its access level and IP ranges.",
        confirmLabel: "Enable",
        run: () => api.enableToken(token.id),
        then: (record) => {
          replace(record);
          toast(`${name} is enabled.`);
        },
        returnFocus: focusAfter(token.id),
      }),
    });
  }
  entries.push({
    label: "Delete",
    danger: true,
    run: () => confirmAction(confirmParts, {
      title: `Delete ${name}?`,
      body: "The token stops working at once and cannot be restored. Its audit log is kept.",
      confirmLabel: "Delete",
      danger: true,
      run: () => api.deleteToken(token.id),
      then: () => {
        remove(token.id);
        toast(`${name} was deleted.`);
      },
      returnFocus: focusAfter(token.id),
    }),
  });
  return entries;
}

let debounce = null;
view.status.addEventListener("change", () => loadTokens());
view.unused.addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(() => loadTokens(), 300);
});
view.more.addEventListener("click", () => loadTokens({ more: true }));
view.create.addEventListener("click", () => openTokenForm(null, {
  onSaved: (record) => {
    if (matchesFilters(record)) state.items = [listed(record), ...state.items];
    render();
  },
  focusAfter: view.create,
}));

export function clearTokens() {
  state.items = [];
  state.cursor = null;
  actionButtons.clear();
  view.body.replaceChildren();
  view.count.textContent = "";
}
