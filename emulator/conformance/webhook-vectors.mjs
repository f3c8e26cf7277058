// Webhook signature vectors for spec/unit/public/notify_spec.lua: deliveries
// signed by the `standardwebhooks` package for a set of secrets, each one
// checked by the `openai` SDK's own webhooks.verifySignature (with the
// clock at the vector's timestamp) before it is written. Prints JSON.
//   node emulator/conformance/webhook-vectors.mjs > spec/fixtures/webhooks/vectors.json
// With --now: timestamps of now (the spec's live run), else fixed ones.
import { Webhook } from "standardwebhooks";
import OpenAI from "openai";
import { randomBytes } from "node:crypto";

const live = process.argv.includes("--now");
const secrets = live
  ? [0, 1, 2].map(() => "whsec_" + randomBytes(24 + Math.floor(Math.random() * 16)).toString("base64"))
  : ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_plJ3nmyCDGBKInavdOK15jsl",
     "whsec_" + Buffer.from("a secret of 32 bytes, not random").toString("base64"),
     "whsec_" + Buffer.alloc(64, 0xa5).toString("base64")];
const types = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"];
const client = new OpenAI({ apiKey: "unused" });
const vectors = [];
let n = 0;
for (const secret of secrets) {
  for (const type of types) {
    n++;
    const ts = live ? Math.floor(Date.now() / 1000) : 1751500000 + n * 7;
    const id = `msg_${live ? randomBytes(8).toString("hex") : "vector" + n}`;
    const body = JSON.stringify({ object: "event", id: `evt_${n}`, type, created_at: ts,
                                  data: { id: `batch_vec${n}` }, note: "ünïcode ✓ " + n });
    const wh = new Webhook(secret);
    const signature = wh.sign(id, new Date(ts * 1000), body);
    const headers = { "webhook-id": id, "webhook-timestamp": String(ts), "webhook-signature": signature };
    const realNow = Date.now;
    Date.now = () => ts * 1000;    // both checks' clocks at the vector's time
    try {
      wh.verify(body, headers);    // standardwebhooks' own check
      await client.webhooks.verifySignature(body, headers, secret);   // the SDK's
    } finally { Date.now = realNow; }
    vectors.push({ secret, id, timestamp: ts, body, signature, type, batch_id: `batch_vec${n}` });
  }
}
process.stdout.write(JSON.stringify(vectors, null, 1) + "\n");
