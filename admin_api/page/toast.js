// A short confirmation ("“CRM sync” is disabled.") in a polite live region, gone after a few seconds.

const element = document.getElementById("toast");
let timer = null;

export function toast(message) {
  clearTimeout(timer);
  element.textContent = message;
  element.classList.add("visible");
  timer = setTimeout(() => {
    element.classList.remove("visible");
    element.textContent = "";
  }, 4000);
}
