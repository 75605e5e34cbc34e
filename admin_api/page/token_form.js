// The "Create API token" / "Edit API token" form, and the dialog that shows a new token once.
// A token only ever goes into an input's `value` (never into markup), and is cleared when its dialog closes.

import { api, ApiError } from "./api.js";
import { openDialog, setBusy, setUpDialog } from "./dialogs.js";
import { fromLocalInput, levelLabel, toLocalInput } from "./format.js";
import { readRanges } from "./ip_ranges.js";

const $ = (id) => document.getElementById(id);

const dialog = $("token-form-dialog");
const form = $("token-form");
const title = $("token-form-title");
const submit = $("tf-submit");
const formError = $("token-form-error");
const controls = {
  name: $("tf-name"),
  access_level: $("tf-level"),
  allowed_ip_ranges: $("tf-ranges"),
  expires_at: $("tf-expires"),
  rate_limit: $("tf-rate"),
  quota: $("tf-quota"),
};
const rateSeconds = $("tf-rate-seconds");
const rateBurst = $("tf-rate-burst");
const quotaPeriod = $("tf-quota-period");
const errors = {
  name: $("tf-name-error"),
  access_level: $("tf-level-error"),
  allowed_ip_ranges: $("tf-ranges-error"),
  expires_at: $("tf-expires-error"),
  rate_limit: $("tf-rate-error"),
  quota: $("tf-quota-error"),
};
const levelHint = $("tf-level-hint");
const suggest = $("tf-ranges-suggest");
const suggestList = $("tf-ranges-suggest-list");

const shownDialog = $("token-shown-dialog");
const shownTitle = $("token-shown-title");
const tokenValue = $("token-value");
const copyButton = $("token-copy");
const copied = $("token-copied");

let levels = [];
let editing = null; // the token being edited, or null when creating
let initial = {}; // the form's values when it opened, to send only what changed
let saved = () => {};
let returnFocus = null;

function showError(field, message) {
  const element = errors[field];
  element.replaceChildren();
  if (Array.isArray(message)) {
    const list = document.createElement("ul");
    for (const { line, message: text } of message) {
      const item = document.createElement("li");
      item.textContent = message.length > 1 || line > 1 ? `Line ${line}: ${text}` : text;
      list.append(item);
    }
    element.append(list);
  } else {
    element.textContent = message;
  }
  element.hidden = false;
  controls[field].setAttribute("aria-invalid", "true");
}

function clearError(field) {
  errors[field].hidden = true;
  errors[field].replaceChildren();
  controls[field].removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const field of Object.keys(errors)) clearError(field);
  formError.hidden = true;
  formError.textContent = "";
}

function showLevelHint() {
  const level = levels.find((item) => item.name === controls.access_level.value);
  levelHint.textContent = level ? level.description : "";
}

function checkRanges() {
  const { problems } = readRanges(controls.allowed_ip_ranges.value);
  if (problems.length) showError("allowed_ip_ranges", problems);
  else clearError("allowed_ip_ranges");
  return problems.length === 0;
}

export async function loadLevels() {
  levels = (await api.accessLevels()).items;
  const select = controls.access_level;
  select.replaceChildren();
  const placeholder = new Option("Choose an access level", "");
  placeholder.disabled = true;
  select.append(placeholder);
  for (const level of levels) select.append(new Option(levelLabel(level.name), level.name));
}

function values() {
  return {
    name: controls.name.value.trim(),
    access_level: controls.access_level.value,
    allowed_ip_ranges: controls.allowed_ip_ranges.value,
    expires_at: controls.expires_at.value,
    rate_limit: [controls.rate_limit.value, rateSeconds.value, rateBurst.value].map((v) => v.trim()).join("/"),
    quota: controls.quota.value.trim() ? `${controls.quota.value.trim()}/${quotaPeriod.value}` : "",
  };
}

// A whole number from 1 up, "" for an empty input, or null for anything else.
function count(text) {
  const value = text.trim();
  if (value === "") return "";
  return /^[0-9]{1,10}$/.test(value) && Number(value) >= 1 ? Number(value) : null;
}

// The rate_limit to send: null for none, undefined (with the error shown) when the inputs do not make one.
function readRateLimit() {
  const requests = count(controls.rate_limit.value);
  const seconds = count(rateSeconds.value);
  const burst = count(rateBurst.value);
  if (requests === "" && seconds === "" && burst === "") return null;
  if (requests === null || seconds === null || burst === null) {
    showError("rate_limit", "Enter whole numbers from 1 up.");
    return undefined;
  }
  if (requests === "" || seconds === "") {
    showError("rate_limit", "Enter both the number of requests and the seconds, or leave all three empty.");
    return undefined;
  }
  return { requests, per_seconds: seconds, burst: burst === "" ? null : burst };
}

function readQuota() {
  const requests = count(controls.quota.value);
  if (requests === "") return null;
  if (requests === null) {
    showError("quota", "Enter a whole number from 1 up, or leave it empty.");
    return undefined;
  }
  return { requests, period: quotaPeriod.value };
}

function fill(token) {
  controls.name.value = token ? token.name : "";
  controls.access_level.value = token ? token.access_level : "";
  controls.allowed_ip_ranges.value = token ? token.allowed_ip_ranges.join("\n") : "";
  controls.expires_at.value = token ? toLocalInput(token.expires_at) : "";
  const rate = token ? token.rate_limit : null;
  controls.rate_limit.value = rate ? String(rate.requests) : "";
  rateSeconds.value = rate ? String(rate.per_seconds) : "";
  rateBurst.value = rate && rate.burst !== null ? String(rate.burst) : "";
  const quota = token ? token.quota : null;
  controls.quota.value = quota ? String(quota.requests) : "";
  quotaPeriod.value = quota ? quota.period : "day";
  showLevelHint();
  initial = values();
}

// The addresses the token was recently used from, each a button that adds it to the allowed ranges: tightening
// a token's ranges to where it is really used is one step.
async function offerAddresses(token) {
  suggest.hidden = true;
  suggestList.replaceChildren();
  if (!token) return;
  let recent = [];
  try {
    recent = (await api.getToken(token.id)).recent_addresses || [];
  } catch {
    return; // only a suggestion: the form works without it
  }
  if (editing !== token) return;
  for (const { address, uses } of recent) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip chip-button";
    button.textContent = `${address} (${uses})`;
    button.setAttribute("aria-label", `Allow ${address}, used ${uses} ${uses === 1 ? "time" : "times"}`);
    button.addEventListener("click", () => addRange(address, button));
    suggestList.append(button);
  }
  suggest.hidden = recent.length === 0;
}

function addRange(address, button) {
  const field = controls.allowed_ip_ranges;
  const lines = field.value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (!lines.includes(address)) field.value = [...lines, address].join("\n");
  button.disabled = true;
  checkRanges();
}

// `onSaved(record)` runs after a successful create or edit; `focusAfter` is where focus goes on close.
export function openTokenForm(token, { onSaved, focusAfter }) {
  editing = token;
  saved = onSaved;
  returnFocus = focusAfter;
  title.textContent = token ? "Edit API token" : "Create API token";
  submit.textContent = token ? "Save" : "Create";
  clearErrors();
  fill(token);
  offerAddresses(token);
  openDialog(dialog, { returnFocus: focusAfter, focus: controls.name });
}

function readForm() {
  const current = values();
  let valid = true;
  if (!current.name) {
    showError("name", "Enter a name.");
    valid = false;
  }
  if (!current.access_level) {
    showError("access_level", "Choose an access level.");
    valid = false;
  }
  if (!checkRanges()) valid = false;
  const expiresAt = fromLocalInput(current.expires_at);
  if (expiresAt === undefined) {
    showError("expires_at", "Enter a complete date and time.");
    valid = false;
  } else if (expiresAt !== null && Date.parse(expiresAt) <= Date.now() && current.expires_at !== initial.expires_at) {
    showError("expires_at", "Choose a time in the future.");
    valid = false;
  }
  const rateLimit = readRateLimit();
  if (rateLimit === undefined) valid = false;
  const quota = readQuota();
  if (quota === undefined) valid = false;
  if (!valid) return null;
  const body = {
    name: current.name,
    access_level: current.access_level,
    allowed_ip_ranges: readRanges(current.allowed_ip_ranges).ranges,
    expires_at: expiresAt,
    rate_limit: rateLimit,
    quota,
  };
  if (!editing) return body;
  // An edit sends only what changed: an unchanged expiry that has passed meanwhile must not be refused.
  return Object.fromEntries(Object.entries(body).filter(([field]) => current[field] !== initial[field]));
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const body = readForm();
  if (body === null) {
    const invalid = Object.values(controls).find((control) => control.getAttribute("aria-invalid") === "true");
    if (invalid) invalid.focus();
    return;
  }
  setBusy(submit, true);
  try {
    if (editing && Object.keys(body).length === 0) {
      dialog.close();
      return;
    }
    const record = editing ? await api.editToken(editing.id, body) : await api.createToken(body);
    dialog.close();
    saved(record);
    if (!editing) showToken(record.token, { heading: "API token created", focusAfter: returnFocus });
  } catch (failure) {
    // "rate_limit.per_seconds" is shown at the rate limit's inputs.
    const field = failure instanceof ApiError && failure.field ? failure.field.split(".")[0] : null;
    if (field && field in controls) {
      showError(field, failure.message);
      controls[field].focus();
    } else {
      formError.textContent = failure.message;
      formError.hidden = false;
    }
  } finally {
    setBusy(submit, false);
  }
});

controls.allowed_ip_ranges.addEventListener("input", checkRanges);
controls.access_level.addEventListener("change", () => {
  clearError("access_level");
  showLevelHint();
});
controls.name.addEventListener("input", () => clearError("name"));
controls.expires_at.addEventListener("input", () => clearError("expires_at"));
for (const input of [controls.rate_limit, rateSeconds, rateBurst]) {
  input.addEventListener("input", () => clearError("rate_limit"));
}
controls.quota.addEventListener("input", () => clearError("quota"));
setUpDialog(dialog);

export function showToken(token, { heading, focusAfter }) {
  shownTitle.textContent = heading;
  tokenValue.value = token;
  copied.textContent = "";
  openDialog(shownDialog, { returnFocus: focusAfter, focus: copyButton });
}

async function copyToken() {
  try {
    await navigator.clipboard.writeText(tokenValue.value);
  } catch {
    // No async clipboard (plain http on another host, or no permission): copy the selection instead.
    tokenValue.select();
    if (!document.execCommand("copy")) {
      copied.textContent = "Copying failed: select the token and copy it by hand.";
      return;
    }
  }
  copied.textContent = "Copied to the clipboard.";
}

copyButton.addEventListener("click", copyToken);
tokenValue.addEventListener("focus", () => tokenValue.select());
setUpDialog(shownDialog, {
  onClose: () => {
    tokenValue.value = "";
    copied.textContent = "";
  },
});
