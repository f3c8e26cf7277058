// The official openai SDK side of bench/compare, doing what bench/jobs.lua
// does: `jobs N M POLL` (Promise.all with polling), `upload FILE`,
// `download FILE_ID PATH`. Needs emulator/conformance/node_modules.
import OpenAI from "openai";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const client = new OpenAI({ apiKey: process.env.DASHSCOPE_API_KEY, baseURL: process.env.LBATCH_BASE_URL,
                            maxRetries: 2, timeout: 600000 });
const [mode, a, b, c] = process.argv.slice(2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const FINAL = new Set(["completed", "failed", "expired", "cancelled"]);

if (mode === "upload") {
  const f = await client.files.create({ file: fs.createReadStream(a), purpose: "batch" });
  console.log(`uploaded ${f.bytes} bytes`);
  console.log(f.id);
} else if (mode === "download") {
  const res = await client.files.content(a);
  fs.writeFileSync(b, Buffer.from(await res.arrayBuffer()));
  console.log(`downloaded ${fs.statSync(b).size} bytes`);
} else {
  const n = Number(a || 1000), m = Number(b || 100), poll = Number(c || 1);
  const file = path.join(os.tmpdir(), `lbatch-bench-sdk-${process.pid}.jsonl`);
  const lines = [];
  for (let i = 1; i <= m; i++) {
    lines.push(JSON.stringify({ custom_id: `r${i}`, method: "POST", url: "/v1/chat/completions",
      body: { model: "qwen-plus", messages: [{ role: "user", content: `question ${i}` }] } }));
  }
  fs.writeFileSync(file, lines.join("\n") + "\n");
  let total = 0;
  await Promise.all(Array.from({ length: n }, async () => {
    const f = await client.files.create({ file: fs.createReadStream(file), purpose: "batch" });
    let batch = await client.batches.create({ input_file_id: f.id, endpoint: "/v1/chat/completions",
                                              completion_window: "24h" });
    while (!FINAL.has(batch.status)) {
      await sleep(poll * 1000 * (0.8 + 0.4 * Math.random()));
      batch = await client.batches.retrieve(batch.id);
    }
    const text = await (await client.files.content(batch.output_file_id)).text();
    total += text.split("\n").filter(Boolean).length;
  }));
  fs.unlinkSync(file);
  console.log(`${n} batches, ${total} result lines`);
}
