// The providers' own SDKs (pinned in package.json) run a files-and-batches
// lifecycle against the emulator in their provider's dialect: upload,
// create, retrieve until it ends, list, content, cancel, the file's info,
// the file list and delete, whatever of those each SDK offers. Every
// answer is checked against the SDK's own types (its src/ in node_modules).
// Exits non-zero on the first failed check.
//
//   node providers.mjs azure|groq|together|cerebras EMULATOR_URL API_KEY WORKDIR
//
// azure:    openai's AzureOpenAI client (src/azure.ts): {endpoint}/openai,
//           ?api-version= on every request, the api-key header
// groq:     groq-sdk (src/resources/files.ts, batches.ts): /openai/v1/...
// together: together-ai (src/lib/upload.ts: three steps; src/resources/
//           batches.ts: {job, warning}, capital statuses, a bare-array list)
// cerebras: @cerebras/cerebras_cloud_sdk has no files or batches resource;
//           its client's own get/post/delete and multipart helper run them
import fs from "node:fs";
import path from "node:path";
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const [, , dialect, url, key, workdir] = process.argv;
let checks = 0;
const check = (cond, what) => { assert.ok(cond, what); checks++; };
const equal = (a, b, what) => { assert.equal(a, b, what); checks++; };
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

// three requests, as each provider's chat endpoint takes them
function input(name, url = "/v1/chat/completions") {
  const file = path.join(workdir, name);
  const lines = [1, 2, 3].map((i) => JSON.stringify({
    custom_id: `r-${i}`, method: "POST", url,
    body: { model: "m-1", messages: [{ role: "user", content: `question ${i}` }] },
  }));
  fs.writeFileSync(file, lines.join("\n") + "\n");
  return file;
}

async function last() {
  return (await fetch(`${url}/_emulator/last`)).json();
}

async function stats() {
  return (await fetch(`${url}/_emulator/stats`)).json();
}

// until `get` answers a final status (`final` says which are)
async function until(get, final) {
  for (let i = 0; i < 600; i++) {
    const b = await get();
    if (final(b)) return b;
    await sleep(50);
  }
  throw new Error("the batch did not end in 30 s");
}

const FINAL = new Set(["completed", "failed", "expired", "cancelled"]);

// the OpenAI-shaped lifecycle, through any client with files and batches
// resources of OpenAI's names (AzureOpenAI, groq-sdk)
async function openaiShaped(client, { endpoint, info, del, window = "24h", afterEach = async () => {} }) {
  const f = await client.files.create({ file: fs.createReadStream(input("in.jsonl", endpoint)), purpose: "batch" });
  await afterEach("upload");
  check(typeof f.id === "string" && f.bytes > 0, `upload: a file object (${JSON.stringify(f)})`);
  const b = await client.batches.create({ input_file_id: f.id, endpoint, completion_window: window });
  await afterEach("create");
  equal(b.completion_window, window, "create: the window");
  equal(b.object, "batch", "create: a batch");
  check(typeof b.created_at === "number", "create: created_at a number");
  const done = await until(() => client.batches.retrieve(b.id), (x) => FINAL.has(x.status));
  await afterEach("retrieve");
  equal(done.status, "completed", "retrieve: completed");
  equal(done.request_counts.total, 3, "retrieve: request_counts.total");
  const page = await client.batches.list();
  await afterEach("list");
  check(Array.isArray(page.data), "list: a page");
  check(page.data.some((x) => x.id === b.id), "list: holds the batch");
  const res = await client.files.content(done.output_file_id);
  await afterEach("content");
  const text = await res.text();
  equal(text.trim().split("\n").length, 3, "content: three results");
  const f2 = await client.files.create({ file: fs.createReadStream(input("in2.jsonl", endpoint)), purpose: "batch" });
  const b2 = await client.batches.create({ input_file_id: f2.id, endpoint, completion_window: "24h" });
  const c = await client.batches.cancel(b2.id);
  await afterEach("cancel");
  check(["cancelling", "cancelled"].includes(c.status), `cancel: cancelling (${c.status})`);
  const got = await info(f.id);
  equal(got.id, f.id, "the file's info");
  const files = await client.files.list();
  check(files.data.some((x) => x.id === f.id), "files.list: holds the file");
  const gone = await del(f.id);
  await afterEach("delete");
  equal(gone.deleted, true, "delete");
  return done;
}

async function azure() {
  const { AzureOpenAI } = await import("openai");
  const client = new AzureOpenAI({ endpoint: url, apiKey: key, apiVersion: "2024-10-21", maxRetries: 0,
                                   timeout: 30000 });
  // every request: /openai/... (the legacy path), api-version, the api-key header
  const afterEach = async (what) => {
    const l = await last();
    check(l.path.startsWith("/v1/"), `${what}: a path the azure dialect knows`);
    equal(l.query["api-version"], "2024-10-21", `${what}: api-version sent`);
    equal(l.auth, "api-key", `${what}: the api-key header`);
  };
  const done = await openaiShaped(client, { endpoint: "/chat/completions", afterEach,
    info: (id) => client.files.retrieve(id), del: (id) => client.files.delete(id) });
  // Azure's empty ids (azure-ai-docs how-to/batch.md): "" where OpenAI has null
  equal(done.error_file_id, "", "azure: error_file_id is \"\" when there is none");
}

async function groq() {
  const { default: Groq } = await import("groq-sdk");
  const client = new Groq({ apiKey: key, baseURL: url, maxRetries: 0, timeout: 30000 });
  const afterEach = async (what) => {
    const l = await last();
    equal(l.auth, "bearer", `${what}: Bearer`);
  };
  // src/resources/batches.ts: "Durations from `24h` to `7d` are supported"
  await openaiShaped(client, { endpoint: "/v1/chat/completions", afterEach, window: "7d",
    info: (id) => client.files.info(id), del: (id) => client.files.delete(id) });
  const s = await stats();
  check((s.routes || s)["POST /files"] >= 2, "groq: the uploads reached /openai/v1/files");
}

const TOGETHER_FINAL = new Set(["COMPLETED", "FAILED", "EXPIRED", "CANCELLED"]);

async function together() {
  // src/lib/upload.ts reads TOGETHER_API_BASE_URL when it is loaded; its
  // ESM build finds no fs (lib/node-unsafe-imports.mjs calls require), so
  // its upload runs from the CommonJS build only
  process.env.TOGETHER_API_BASE_URL = `${url}/v1`;
  // its PUT hands fetch a file stream without duplex: "half", which Node's
  // fetch (undici, Node 18 on) refuses: added here, nothing else changed
  const fetch0 = globalThis.fetch;
  globalThis.fetch = (u, init = {}) =>
    fetch0(u, init.body && typeof init.body.pipe === "function" ? { ...init, duplex: "half" } : init);
  const Together = createRequire(import.meta.url)("together-ai");
  const client = new Together({ apiKey: key, baseURL: `${url}/v1`, maxRetries: 0, timeout: 30000 });
  // the three steps; check = false: its checker knows fine-tuning files, not batch ones
  const f = await client.files.upload(input("in.jsonl"), "batch-api", false);
  equal(f.purpose, "batch-api", "upload: purpose batch-api");
  equal(f.FileType, "jsonl", "upload: FileType");
  check(f.bytes > 0, "upload: the bytes arrived");
  const s = await stats();
  const routes = s.routes || s;
  equal(routes["PUT presigned"], 1, "upload: one PUT to the presigned URL");
  const created = await client.batches.create({ input_file_id: f.id, endpoint: "/v1/chat/completions" });
  check(created.job && typeof created.job.id === "string", "create: {job, warning}");
  equal(typeof created.warning, "string", "create: warning");
  const id = created.job.id;
  const done = await until(() => client.batches.retrieve(id), (x) => TOGETHER_FINAL.has(x.status));
  equal(done.status, "COMPLETED", "retrieve: COMPLETED");
  equal(done.progress, 100, "retrieve: progress 100");
  equal(done.file_size_bytes, f.bytes, "retrieve: file_size_bytes, the input's");
  check(!Number.isNaN(Date.parse(done.created_at)), "retrieve: created_at an ISO-8601 string");
  const list = await client.batches.list();
  check(Array.isArray(list) && list.some((x) => x.id === id), "list: a bare array holding the batch");
  const text = await (await client.files.content(done.output_file_id)).text();
  equal(text.trim().split("\n").length, 3, "content: three results");
  const f2 = await client.files.upload(input("in2.jsonl"), "batch-api", false);
  const b2 = await client.batches.create({ input_file_id: f2.id, endpoint: "/v1/chat/completions" });
  const c = await client.batches.cancel(b2.job.id);
  equal(c.status, "CANCELLED", "cancel: CANCELLED");
  const got = await client.files.retrieve(f.id);
  equal(typeof got.Processed, "boolean", "retrieve file: Processed");
  const files = await client.files.list();
  check(files.data.some((x) => x.id === f.id), "files.list: {data} holding the file");
  const gone = await client.files.delete(f.id);
  equal(gone.deleted, true, "delete");
}

async function cerebras() {
  const { default: Cerebras } = await import("@cerebras/cerebras_cloud_sdk");
  const { multipartFormRequestOptions } = await import("@cerebras/cerebras_cloud_sdk/uploads");
  const client = new Cerebras({ apiKey: key, baseURL: url, maxRetries: 0, timeout: 30000, warmTCPConnection: false });
  const files = {
    create: (body) => client.post("/v1/files", multipartFormRequestOptions({ body })),
    content: (id) => client.get(`/v1/files/${id}/content`, { __binaryResponse: true }),
    list: () => client.get("/v1/files"),
  };
  const batches = {
    create: (body) => client.post("/v1/batches", { body }),
    retrieve: (id) => client.get(`/v1/batches/${id}`),
    list: () => client.get("/v1/batches"),
    cancel: (id) => client.post(`/v1/batches/${id}/cancel`),
  };
  await openaiShaped({ files, batches }, { endpoint: "/v1/chat/completions",
    info: (id) => client.get(`/v1/files/${id}`), del: (id) => client.delete(`/v1/files/${id}`) });
}

const RUN = { azure, groq, together, cerebras };
if (!RUN[dialect]) {
  console.error(`providers.mjs: no lifecycle for ${dialect}`);
  process.exit(2);
}
try {
  await RUN[dialect]();
  console.log(`${dialect}: ${checks} checks passed`);
} catch (e) {
  // (a connection error's reason is in its cause, and undici's in the cause's)
  let why = "";
  for (let c = e.cause; c; c = c.cause) why += `\n  caused by: ${c.stack || c}${c.code ? ` (${c.code})` : ""}`;
  console.error(`${dialect}: failed after ${checks} checks: ${e.stack || e}${why}`);
  process.exit(1);
}
