// The API Access page of the gateway's admin API: sign-in, the API tokens overview, and the audit log.
//
// Why plain HTML, CSS and JavaScript modules, with no framework and no build step: the page is a few forms
// and two tables over an existing JSON API, which the browser's own elements (<dialog>, <table>, form
// controls) and a few hundred lines of script cover. What the gateway serves is exactly what is in the
// repository, so a security reviewer reads the real thing; nothing needs Node.js to build or release; there
// are no third-party packages to audit and update; and everything comes from the package itself, which is
// what lets a strict Content-Security-Policy (script-src 'self', no inline code) hold.
//
// The admin key lives in sessionStorage (this tab only) and travels only as the Authorization header.

import { api, ApiError, forgetKey, hasKey, onSignedOut, rememberKey } from "./api.js";
import { showAudit } from "./audit_view.js";
import { closeMenu } from "./menu.js";
import { loadLevels } from "./token_form.js";
import { clearTokens, loadTokens, setRole } from "./tokens_view.js";

const $ = (id) => document.getElementById(id);

const views = { signIn: $("sign-in-view"), tokens: $("tokens-view"), audit: $("audit-view") };
const signInForm = $("sign-in-form");
const keyInput = $("admin-key");
const keyError = $("admin-key-error");
const signInButton = $("sign-in-button");
const nav = { bar: $("nav"), tokens: $("nav-tokens"), audit: $("nav-audit") };
const who = { box: $("who"), name: $("who-name"), role: $("who-role") };

let session = null; // { id, name, role } of the admin key in use

function show(name) {
  for (const [key, element] of Object.entries(views)) element.hidden = key !== name;
  nav.bar.hidden = session === null;
  who.box.hidden = session === null;
  for (const [section, link] of [["tokens", nav.tokens], ["audit", nav.audit]]) {
    if (section === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function route() {
  closeMenu();
  if (session === null) {
    show("signIn");
    return;
  }
  const [, section, tokenId] = window.location.hash.split("/");
  if (section === "audit") {
    show("audit");
    document.title = "Audit log · Gateway admin";
    await showAudit(tokenId ? decodeURIComponent(tokenId) : null, session);
  } else {
    show("tokens");
    document.title = "API Access · Gateway admin";
    await loadTokens();
  }
}

async function start(answer) {
  session = answer;
  who.name.textContent = session.name;
  who.role.textContent = session.role;
  who.role.className = `role role-${session.role === "admin" ? "admin" : "viewer"}`;
  // Anything but "admin" may only read: the page offers no change the API would refuse.
  setRole(session.role === "admin");
  // Without the list the form still opens, and the API's answer names the levels it knows.
  if (session.role === "admin") await loadLevels().catch(() => {});
  await route();
}

function signedOut(message) {
  session = null;
  forgetKey();
  clearTokens();
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  show("signIn");
  keyError.textContent = message ?? "";
  keyError.hidden = !message;
  keyInput.setAttribute("aria-invalid", message ? "true" : "false");
  keyInput.focus();
}

signInForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!key) {
    signedOut("Enter an admin key.");
    return;
  }
  signInButton.disabled = true;
  try {
    const answer = await api.session(key);
    rememberKey(key);
    keyInput.value = "";
    keyError.hidden = true;
    keyInput.removeAttribute("aria-invalid");
    await start(answer);
    $("main").focus();
  } catch (failure) {
    const refused = failure instanceof ApiError && failure.status === 401;
    signedOut(refused ? "This admin key is not valid." : failure.message);
  } finally {
    signInButton.disabled = false;
  }
});

$("sign-out").addEventListener("click", () => signedOut());
onSignedOut(() => signedOut("The admin key is no longer valid. Sign in again."));
window.addEventListener("hashchange", () => {
  route().then(() => $("main").focus({ preventScroll: true }));
});

async function boot() {
  if (!hasKey()) {
    signedOut();
    return;
  }
  try {
    await start(await api.session());
  } catch (failure) {
    // A refused key has already signed the page out, saying why.
    if (!(failure instanceof ApiError && failure.status === 401)) signedOut(failure.message);
  }
}

boot();
