// Modal dialogs on the native <dialog>: showModal() makes the rest of the page inert, Tab is kept inside
// (wrapping at both ends), Escape or Cancel closes, and focus goes back to what opened the dialog.

const FOCUSABLE = [
  "a[href]", "button:not([disabled])", "input:not([disabled])", "select:not([disabled])",
  "textarea:not([disabled])", "[tabindex]:not([tabindex='-1'])",
].join(",");

function focusables(dialog) {
  return [...dialog.querySelectorAll(FOCUSABLE)].filter(
    (element) => !element.closest("[hidden]") && element.getClientRects().length > 0,
  );
}

function trapTab(event) {
  if (event.key !== "Tab") return;
  const dialog = event.currentTarget;
  const items = focusables(dialog);
  if (items.length === 0) return;
  const first = items[0];
  const last = items[items.length - 1];
  if (event.shiftKey && (document.activeElement === first || !dialog.contains(document.activeElement))) {
    event.preventDefault();
    last.focus();
  } else if (!event.shiftKey && (document.activeElement === last || !dialog.contains(document.activeElement))) {
    event.preventDefault();
    first.focus();
  }
}

const openers = new WeakMap();

export function setUpDialog(dialog, { onClose } = {}) {
  dialog.addEventListener("keydown", trapTab);
  for (const button of dialog.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => dialog.close());
  }
  dialog.addEventListener("close", () => {
    if (onClose) onClose();
    const opener = openers.get(dialog);
    openers.delete(dialog);
    // The opener may have been re-rendered meanwhile (a table row): a function finds its successor. When
    // another dialog took over (the new token after "Create"), that one hands focus back later.
    const target = typeof opener === "function" ? opener() : opener;
    if (target && target.isConnected && !document.querySelector("dialog[open]")) target.focus();
  });
}

// `returnFocus` is an element, or a function giving one when the dialog closes.
export function openDialog(dialog, { returnFocus, focus } = {}) {
  openers.set(dialog, returnFocus ?? document.activeElement);
  dialog.showModal();
  const target = focus ?? focusables(dialog)[0];
  if (target) target.focus();
}

export function setBusy(button, busy) {
  button.disabled = busy;
  button.setAttribute("aria-busy", busy ? "true" : "false");
}

// A confirmation: title, sentence, and a confirm button named by the action ("Rotate", "Delete" ...).
// `run` performs the action; its error is shown in the dialog, which then stays open. `then` gets run's
// result once the dialog has closed.
export function confirmAction(parts, options) {
  const { title, body, confirmLabel, danger = false, withGrace = false, run, then, returnFocus } = options;
  const { dialog, form, titleElement, bodyElement, button, graceField, grace, error } = parts;
  titleElement.textContent = title;
  bodyElement.textContent = body;
  button.textContent = confirmLabel;
  button.classList.toggle("btn-danger", danger);
  button.classList.toggle("btn-primary", !danger);
  graceField.hidden = !withGrace;
  grace.value = "0";
  error.hidden = true;
  error.textContent = "";
  form.onsubmit = async (event) => {
    event.preventDefault();
    setBusy(button, true);
    try {
      const result = await run({ graceSeconds: Number(grace.value) });
      dialog.close();
      if (then) then(result);
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
    } finally {
      setBusy(button, false);
    }
  };
  // Destructive actions start on Cancel, so a stray Enter does not delete anything.
  const cancel = dialog.querySelector("[data-close]");
  openDialog(dialog, { returnFocus, focus: danger ? cancel : withGrace ? grace : button });
}
