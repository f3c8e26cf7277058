// The official openai SDK runs the whole Batch lifecycle against the
// emulator through `prism proxy --errors` and the OpenAPI description.
// Exits non-zero on the first failed check or on any Prism violation.
//
//   node lifecycle.mjs EMULATOR_URL SPEC_JSON WORKDIR
//
// Prism forwards a chunked upload with both Transfer-Encoding and
// Content-Length, which nginx refuses (RFC 9112 6.3 allows that), so a small
// relay between Prism and the emulator drops the redundant Content-Length.
import OpenAI, { NotFoundError } from "openai";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const [, , emulatorURL, specPath, workdir] = process.argv;
const here = path.dirname(fileURLToPath(import.meta.url));

function relay(target) {
  const up = new URL(target);
  const server = http.createServer({ insecureHTTPParser: true }, (req, res) => {
    const headers = { ...req.headers };
    if (headers["transfer-encoding"]) delete headers["content-length"];
    const out = http.request({ host: up.hostname, port: up.port, method: req.method, path: req.url, headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    out.on("error", () => { res.destroy(); });
    req.pipe(out);
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

// a port that is free now: the system's pick for a throwaway listener
function freePort() {
  return new Promise((ok) => {
    const probe = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => ok(port));
    });
  });
}

function startPrism(upstream, port) {
  const bin = path.join(here, "node_modules", ".bin", "prism");
  const child = spawn(bin, ["proxy", "--errors", "-p", String(port), specPath, upstream], { stdio: ["ignore", "pipe", "pipe"] });
  // however this script ends (a failed check throws), Prism goes with it
  process.on("exit", () => child.kill("SIGTERM"));
  let log = "";
  return new Promise((ok, fail) => {
    const onData = (d) => {
      log += d;
      if (log.includes("Prism is listening")) ok({ child, port, log: () => log });
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("exit", (code) => fail(Object.assign(new Error(`prism exited (${code}): ${log}`), { log })));
    setTimeout(() => fail(new Error(`prism did not start: ${log}`)), 60000);
  });
}

// Prism on a free port; again on another if something took it meanwhile
async function prism(upstream) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startPrism(upstream, await freePort());
    } catch (e) {
      if (attempt >= 5 || !/EADDRINUSE/.test(e.log || "")) throw e;
    }
  }
}

const server = await relay(emulatorURL);
const proxy = await prism(`http://127.0.0.1:${server.address().port}`);
const baseURL = `http://127.0.0.1:${proxy.port}/v1`;
const client = new OpenAI({ apiKey: "conformance-key", baseURL, maxRetries: 0, timeout: 30000 });
let checks = 0;
const check = (cond, msg) => { assert.ok(cond, msg); checks++; };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function requests(file, n, model = "qwen-plus") {
  const lines = [];
  for (let i = 1; i <= n; i++) {
    lines.push(JSON.stringify({
      custom_id: `c${i}`, method: "POST", url: "/v1/chat/completions",
      body: { model, messages: [{ role: "user", content: `问题 ${i}: 2 + ${i} = ? ✓` }] },
    }));
  }
  fs.writeFileSync(file, lines.join("\n") + "\n");
  return file;
}

async function until(id, done, ms = 30000) {
  const end = Date.now() + ms;
  for (;;) {
    const b = await client.batches.retrieve(id);
    if (done(b.status)) return b;
    if (Date.now() > end) throw new Error(`batch ${id} still ${b.status}`);
    await sleep(100);
  }
}

// upload
const input = requests(path.join(workdir, "input.jsonl"), 5);
const file = await client.files.create({ file: fs.createReadStream(input), purpose: "batch" });
check(file.id && file.object === "file" && file.purpose === "batch", "upload returns a file object");
check(file.bytes === fs.statSync(input).size, "file.bytes is the size uploaded");

// create, retrieve until done
const created = await client.batches.create({
  input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h",
  metadata: { suite: "conformance" },
});
check(created.status === "validating" && created.input_file_id === file.id, "create returns a validating batch");
const done = await until(created.id, (s) => ["completed", "failed", "expired", "cancelled"].includes(s));
check(done.status === "completed", `batch completed (got ${done.status})`);
check(done.request_counts.total === 5 && done.request_counts.completed === 5, "request_counts of a finished batch");
check(typeof done.completed_at === "number" && typeof done.in_progress_at === "number", "timestamps are set");

// content
const res = await client.files.content(done.output_file_id);
const lines = (await res.text()).trim().split("\n").map((l) => JSON.parse(l));
check(lines.length === 5, "output file has one line per request");
check(lines.every((l) => l.response.status_code === 200 && l.error === null), "every line succeeded");
check(new Set(lines.map((l) => l.custom_id)).size === 5, "custom_ids come back");
check(lines[0].response.body.choices[0].message.content.length > 0, "chat answers are present");

// list with auto-pagination
for (let i = 0; i < 2; i++) {
  await client.batches.create({ input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h" });
}
const seen = [];
for await (const b of client.batches.list({ limit: 1 })) seen.push(b.id);
check(seen.length >= 3 && new Set(seen).size === seen.length, "auto-pagination visits every batch once");
check(seen.includes(created.id), "the first batch is listed");
const files = [];
for await (const f of client.files.list()) files.push(f.id);
check(files.includes(file.id) && files.includes(done.output_file_id), "files are listed");

// cancel a batch that runs for a long time
const slow = await client.batches.create({
  input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h",
  metadata: { emulator_line_seconds: "3600" },
});
const cancelling = await client.batches.cancel(slow.id);
check(["cancelling", "cancelled"].includes(cancelling.status), "cancel answers cancelling");
const cancelled = await until(slow.id, (s) => s === "cancelled");
check(cancelled.status === "cancelled" && typeof cancelled.cancelled_at === "number", "the batch ends cancelled");

// file retrieve and delete
const again = await client.files.retrieve(file.id);
check(again.id === file.id, "file retrieve");
const del = await client.files.delete(file.id);
check(del.deleted === true && del.id === file.id, "file delete");

// a 404 (the description defines only 200 responses, so Prism warns that
// it cannot match the status: that one warning, in this step, is expected)
const before404 = proxy.log().length;
try {
  await client.batches.retrieve("batch_does_not_exist");
  check(false, "retrieving a missing batch must fail");
} catch (e) {
  check(e instanceof NotFoundError && e.status === 404, `a missing batch is a 404 (got ${e.status} ${e.message})`);
}

await sleep(200);
const isViolation = (l) => /violation/i.test(l);
const expected = proxy.log().slice(before404).split("\n").filter(isViolation);
check(expected.length === 1 && /Unable to match the returned status code/.test(expected[0]),
  "the 404 step gives only Prism's undefined-status warning");
const violations = proxy.log().slice(0, before404).split("\n").filter(isViolation);
proxy.child.kill("SIGTERM");
server.close();
for (const v of violations) console.log(v);
console.log(`prism: ${violations.length} violations`);
console.log(`conformance: ${checks} checks passed`);
process.exit(violations.length === 0 ? 0 : 1);
