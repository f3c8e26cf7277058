// DuckDB's join of the same files as bench/scale.lua single|merge, for
// make bench-join: node bench/duckdb/join.mjs DIR THREADS one|shard [fields|whole]
// fields (the default): the query reads the inputs' custom_id with its
// position, the outputs' and errors' custom_id, response.status_code and
// first choice's content, as each{fields = {"status_code", "content"}}.
// whole: it reads the columns of lbatch's whole record besides: the
// answer's id, request_id, model, created, usage and reasoning, and the
// request line as it is in the file (rec.line), as each() with no fields.
// Either left-joins them on custom_id in input order, and the host counts
// ok, failed and missing rows as it streams them (as lbatch's each() loop).
import { DuckDBInstance } from "@duckdb/node-api";

const [dir, threads, how, what = "fields"] = process.argv.slice(2);
const whole = what === "whole";
const one = how === "one";
const inputs = one ? `${dir}/all.in.jsonl` : `${dir}/s*.in.jsonl`;
const answers = one ? [`${dir}/all.out.jsonl`, `${dir}/all.err.jsonl`] : [`${dir}/s*.out.jsonl`, `${dir}/s*.err.jsonl`];
const body = whole
  ? "body STRUCT(model VARCHAR, created BIGINT, usage STRUCT(prompt_tokens BIGINT, completion_tokens BIGINT, "
    + "total_tokens BIGINT), choices STRUCT(message STRUCT(content VARCHAR, reasoning_content VARCHAR))[])"
  : "body STRUCT(choices STRUCT(message STRUCT(content VARCHAR))[])";
const cols = `columns = {${whole ? "id: 'VARCHAR', " : ""}custom_id: 'VARCHAR', error: 'JSON', `
  + `response: 'STRUCT(status_code INTEGER, ${whole ? "request_id VARCHAR, " : ""}${body})'}`;
const list = (a) => "[" + a.map((p) => `'${p}'`).join(", ") + "]";
// the request lines whole: one VARCHAR column a line (no delimiter or quote a JSON line can hold)
const requests = whole
  ? `SELECT json_extract_string(line, '$.custom_id') AS custom_id, line, filename
     FROM read_csv('${inputs}', columns = {line: 'VARCHAR'}, delim = '\\x01', quote = '', escape = '',
                   header = false, filename = true)`
  : `SELECT custom_id, filename FROM read_json('${inputs}', format = 'newline_delimited', filename = true,
                                              columns = {custom_id: 'VARCHAR'})`;
const more = whole
  ? `, o.id, o.status, o.request_id, o.model, o.created, o.usage, o.content, o.reasoning, i.line`
  : `, o.content`;
const sql = `
  WITH i AS (SELECT *, row_number() OVER () AS pos FROM (${requests})),
       o AS (SELECT custom_id, error, response.status_code AS status,
                    response.body.choices[1].message.content AS content
                    ${whole ? `, id, response.request_id AS request_id, response.body.model AS model,
                    response.body.created AS created, response.body.usage AS usage,
                    response.body.choices[1].message.reasoning_content AS reasoning` : ""}
             FROM read_json(${list(answers)}, format = 'newline_delimited', ${cols}))
  SELECT i.custom_id, o.custom_id IS NULL AS missing, o.status = 200 AND o.error IS NULL AS ok${more}
  FROM i LEFT JOIN o ON i.custom_id = o.custom_id
  ORDER BY i.filename, i.pos`;

const t0 = process.hrtime.bigint();
const db = await DuckDBInstance.create(":memory:", { threads: String(threads) });
const con = await db.connect();
const result = await con.stream(sql);
let n = 0, ok = 0, failed = 0, missing = 0;
for (;;) {
  const chunk = await result.fetchChunk();
  if (!chunk || chunk.rowCount === 0) break;
  const miss = chunk.getColumnVector(1), good = chunk.getColumnVector(2);
  for (let r = 0; r < chunk.rowCount; r++) {
    n++;
    if (miss.getItem(r)) missing++;
    else if (good.getItem(r)) ok++;
    else failed++;
  }
}
const t = Number(process.hrtime.bigint() - t0) / 1e9;
console.log(`${n} records (${ok} ok, ${failed} failed, ${missing} missing), ${(n / t).toFixed(0)} records/s`);
