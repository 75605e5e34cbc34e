// The admin API as the page uses it: the admin key from sessionStorage as the bearer header, JSON in and out,
// RFC 9457 problems turned into ApiError. The key never goes into a URL, localStorage, a cookie or a log line.

const KEY_STORAGE = "gateway.adminKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `The admin API answered ${status}.`);
    this.status = status;
    this.code = problem.code || "";
    this.field = problem.field || null;
  }
}

const signedOutListeners = [];

export function onSignedOut(listener) {
  signedOutListeners.push(listener);
}

export function hasKey() {
  return sessionStorage.getItem(KEY_STORAGE) !== null;
}

export function rememberKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

export async function request(method, path, { query, body, key } = {}) {
  const bearer = key ?? sessionStorage.getItem(KEY_STORAGE);
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json" };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
    });
  } catch {
    throw new ApiError(0, { detail: "The admin API could not be reached. Check the connection and try again." });
  }
  if (response.status === 204) return null;
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = {};
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    // Only a key we were using can be refused; a wrong key typed at sign-in is the sign-in form's business.
    if (response.status === 401 && key === undefined) {
      forgetKey();
      for (const listener of signedOutListeners) listener(error);
    }
    throw error;
  }
  return data;
}

export const api = {
  session: (key) => request("GET", "/v1/session", { key }),
  accessLevels: () => request("GET", "/v1/access-levels"),
  listTokens: (query) => request("GET", "/v1/tokens", { query }),
  getToken: (id) => request("GET", `/v1/tokens/${encodeURIComponent(id)}`),
  createToken: (fields) => request("POST", "/v1/tokens", { body: fields }),
  editToken: (id, fields) => request("PATCH", `/v1/tokens/${encodeURIComponent(id)}`, { body: fields }),
  rotateToken: (id, graceSeconds) =>
    request("POST", `/v1/tokens/${encodeURIComponent(id)}/rotate`, { body: { grace_seconds: graceSeconds } }),
  endGrace: (id) => request("POST", `/v1/tokens/${encodeURIComponent(id)}/end-grace`),
  disableToken: (id) => request("POST", `/v1/tokens/${encodeURIComponent(id)}/disable`),
  enableToken: (id) => request("POST", `/v1/tokens/${encodeURIComponent(id)}/enable`),
  deleteToken: (id) => request("DELETE", `/v1/tokens/${encodeURIComponent(id)}`),
  tokenUsage: (id, granularity) =>
    request("GET", `/v1/tokens/${encodeURIComponent(id)}/usage`, { query: { granularity } }),
  listAudit: (query) => request("GET", "/v1/audit", { query }),
  listAdminKeys: () => request("GET", "/v1/admin-keys"),
};
