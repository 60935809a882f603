// kasou's API from the browser: the session cookie signs requests in; every change carries x-kasou-csrf.
export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.details = (body && body.details) || {};
  }
}

export async function api(method, path, body) {
  const opts = { method, headers: { "x-kasou-csrf": "1" }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body) => api("POST", path, body);
export const put = (path, body) => api("PUT", path, body);

export async function me() {
  try {
    return await get("/v1/auth/me");
  } catch (e) {
    if (e.status === 401) return null;
    throw e;
  }
}

// totp: the code of a user with the second factor on (the server asks for it: details.totp === "required")
export const login = (name, password, totp) =>
  post("/v1/auth/login", totp ? { name, password, totp } : { name, password });
export const logout = () => post("/v1/auth/logout");

// Follow a job to its end; onUpdate(job) on each change. Resolves with the final job.
export async function followJob(job, onUpdate, timeoutMs = 900000) {
  const t0 = Date.now();
  for (;;) {
    const j = await get(`/v1/jobs/${encodeURIComponent(job.id)}`);
    if (onUpdate) onUpdate(j);
    if (j.state === "succeeded" || j.state === "failed") return j;
    if (Date.now() - t0 > timeoutMs) throw new Error(`job ${job.id} did not finish`);
    await new Promise((res) => setTimeout(res, 300));
  }
}
