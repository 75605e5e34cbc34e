// The per-row "Actions" menu, following the WAI-ARIA menu button pattern: Enter, Space or ArrowDown open it
// on the first item (ArrowUp on the last), arrows, Home and End move, Escape closes and returns focus to the
// button, Tab closes. One menu is open at a time; it is placed with `position: fixed` so that no scrolling
// container clips it.

import { icon } from "./icons.js";

let open = null; // { button, menu }

export function closeMenu({ focusButton = false } = {}) {
  if (!open) return;
  const { button, menu } = open;
  open = null;
  menu.hidden = true;
  button.setAttribute("aria-expanded", "false");
  if (focusButton) button.focus();
}

function items(menu) {
  return [...menu.querySelectorAll("[role='menuitem']")];
}

function place(button, menu) {
  const box = button.getBoundingClientRect();
  menu.style.visibility = "hidden";
  menu.hidden = false;
  const width = menu.offsetWidth;
  const height = menu.offsetHeight;
  const below = box.bottom + 4 + height <= window.innerHeight;
  menu.style.top = `${below ? box.bottom + 4 : Math.max(8, box.top - 4 - height)}px`;
  menu.style.left = `${Math.max(8, Math.min(box.right - width, window.innerWidth - width - 8))}px`;
  menu.style.visibility = "";
}

function openMenu(button, menu, focusLast = false) {
  closeMenu();
  open = { button, menu };
  button.setAttribute("aria-expanded", "true");
  place(button, menu);
  const all = items(menu);
  all[focusLast ? all.length - 1 : 0].focus();
}

let counter = 0;

// `entries`: [{ label, danger?, run }]. `describedBy`: the id of the element naming the row (the token name).
export function actionMenu(entries, { describedBy } = {}) {
  counter += 1;
  const wrap = document.createElement("div");
  wrap.className = "menu-wrap";

  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon-button btn-ghost menu-button";
  button.id = `actions-${counter}`;
  button.setAttribute("aria-label", "Actions");
  button.setAttribute("aria-haspopup", "menu");
  button.setAttribute("aria-expanded", "false");
  button.setAttribute("aria-controls", `menu-${counter}`);
  if (describedBy) button.setAttribute("aria-describedby", describedBy);
  button.append(icon("dots"));

  const menu = document.createElement("ul");
  menu.className = "menu";
  menu.id = `menu-${counter}`;
  menu.setAttribute("role", "menu");
  menu.setAttribute("aria-labelledby", button.id);
  menu.hidden = true;

  for (const entry of entries) {
    const item = document.createElement("li");
    item.setAttribute("role", "menuitem");
    item.tabIndex = -1;
    item.textContent = entry.label;
    if (entry.danger) item.classList.add("danger");
    item.addEventListener("click", () => {
      closeMenu();
      entry.run(button);
    });
    menu.append(item);
  }

  button.addEventListener("click", () => {
    if (open && open.menu === menu) closeMenu();
    else openMenu(button, menu);
  });
  button.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      openMenu(button, menu, event.key === "ArrowUp");
    }
    // Enter and Space reach the button as a click, which opens the menu on its first item.
  });
  menu.addEventListener("keydown", (event) => {
    const all = items(menu);
    const index = all.indexOf(document.activeElement);
    const move = (to) => {
      event.preventDefault();
      all[(to + all.length) % all.length].focus();
    };
    switch (event.key) {
      case "ArrowDown": move(index + 1); break;
      case "ArrowUp": move(index - 1); break;
      case "Home": move(0); break;
      case "End": move(all.length - 1); break;
      case "Escape":
        event.preventDefault();
        closeMenu({ focusButton: true });
        break;
      case "Tab":
        closeMenu({ focusButton: true });
        break;
      case "Enter":
      case " ":
        event.preventDefault();
        if (index !== -1) all[index].click();
        break;
      default:
        if (event.key.length === 1) { // type-ahead: the next item starting with that letter
          const letter = event.key.toLowerCase();
          const next = all.findIndex((item, i) => i > index && item.textContent.toLowerCase().startsWith(letter));
          const first = all.findIndex((item) => item.textContent.toLowerCase().startsWith(letter));
          if (next !== -1 || first !== -1) move(next !== -1 ? next : first);
        }
    }
  });

  wrap.append(button, menu);
  return { element: wrap, button };
}

document.addEventListener("pointerdown", (event) => {
  if (open && !open.menu.contains(event.target) && !open.button.contains(event.target)) closeMenu();
});
window.addEventListener("resize", () => closeMenu());
window.addEventListener("scroll", () => closeMenu(), { passive: true });
