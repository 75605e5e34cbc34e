// How values read on the page: relative times ("3 hours ago", "never"), dates, access level names.

const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
const dateOnly = new Intl.DateTimeFormat("en", { year: "numeric", month: "short", day: "numeric" });
const dateTime = new Intl.DateTimeFormat("en", {
  year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
});
const full = new Intl.DateTimeFormat("en", { dateStyle: "full", timeStyle: "long" });

const UNITS = [
  ["year", 365 * 24 * 3600],
  ["month", 30 * 24 * 3600],
  ["week", 7 * 24 * 3600],
  ["day", 24 * 3600],
  ["hour", 3600],
  ["minute", 60],
];

export function relativeTime(iso, now = Date.now()) {
  const seconds = (Date.parse(iso) - now) / 1000;
  if (Math.abs(seconds) < 45) return "just now";
  for (const [unit, size] of UNITS) {
    if (Math.abs(seconds) >= size * 0.9 || unit === "minute") {
      return relative.format(Math.round(seconds / size), unit);
    }
  }
  return relative.format(Math.round(seconds / 60), "minute");
}

export function shortDate(iso) {
  return dateOnly.format(new Date(iso));
}

export function shortDateTime(iso) {
  return dateTime.format(new Date(iso));
}

export function fullDateTime(iso) {
  return full.format(new Date(iso));
}

export function isPast(iso, now = Date.now()) {
  return iso !== null && Date.parse(iso) <= now;
}

// `managing_editorial` -> `Managing editorial`; the exact name stays available as a tooltip.
export function levelLabel(name) {
  const words = name.replace(/[_-]+/g, " ").trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export function duration(seconds) {
  if (seconds % 86400 === 0) return plural(seconds / 86400, "day");
  if (seconds % 3600 === 0) return plural(seconds / 3600, "hour");
  if (seconds % 60 === 0) return plural(seconds / 60, "minute");
  return plural(seconds, "second");
}

export function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

// A value for <input type="datetime-local"> (local time, minutes) and back to RFC 3339 in UTC.
export function toLocalInput(iso) {
  if (!iso) return "";
  const moment = new Date(iso);
  const pad = (number) => String(number).padStart(2, "0");
  return `${moment.getFullYear()}-${pad(moment.getMonth() + 1)}-${pad(moment.getDate())}` +
    `T${pad(moment.getHours())}:${pad(moment.getMinutes())}`;
}

export function fromLocalInput(value) {
  if (!value) return null;
  const moment = new Date(value);
  return Number.isNaN(moment.getTime()) ? undefined : moment.toISOString();
}

export function daysAgo(days, now = Date.now()) {
  return new Date(now - days * 24 * 3600 * 1000).toISOString();
}
