// A webhook receiver that checks every delivery with the `openai` SDK's
// own webhooks.unwrap (signature, timestamp, payload), for the specs.
//   node webhook-receiver.mjs PORT SECRET [FAIL_FIRST]
// Answers 500 to the first FAIL_FIRST deliveries (the sender must retry),
// then 200 to a good one and 400 to a bad one. Prints one line each:
// "ok WEBHOOK_ID TYPE BATCH_ID", "fail WEBHOOK_ID" or "bad WHY".
import http from "node:http";
import OpenAI from "openai";

const [port, secret, failFirst = "0"] = process.argv.slice(2);
const client = new OpenAI({ apiKey: "unused", webhookSecret: secret });
let toFail = Number(failFirst);
http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", async () => {
    const body = Buffer.concat(chunks).toString("utf8");
    if (toFail > 0) {
      toFail--;
      console.log(`fail ${req.headers["webhook-id"]}`);
      res.writeHead(500).end();
      return;
    }
    try {
      const event = await client.webhooks.unwrap(body, req.headers);
      console.log(`ok ${req.headers["webhook-id"]} ${event.type} ${event.data.id}`);
      res.writeHead(200).end();
    } catch (e) {
      console.log(`bad ${String(e.message).replace(/\s+/g, " ")}`);
      res.writeHead(400).end();
    }
  });
}).listen(Number(port), "127.0.0.1", () => console.log(`listening ${port}`));
