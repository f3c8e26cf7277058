-- The batch lifecycle: validating -> in_progress -> finalizing -> completed,
-- plus failed, cancelling -> cancelled and expired. One ticker moves every
-- active batch along by the clock; the real work (reading the input, writing
-- output and error files) runs in separate timers that yield to requests.
--
-- Service time is scaled by --speed: a stage of D service seconds takes
-- D / speed real seconds.
--
-- b.sim is the simulation's own state of a batch, journaled with it and
-- never shown to clients: t_stage (when its stage began), t_expires, total
-- (lines), fail_lines (lines that fail on purpose), test (batch-test-model),
-- validated, job (a validation or finalization is running), done and
-- missed_code (how far it got, and why the rest did not run), finalized.
local cjson = require "cjson"
local rules = require "lbatch.impl.formats.rules"
local store = require "emu.store"
local util = require "emu.util"
local modes = require "emu.modes"

local E = {
  VALIDATE = 10,      -- service seconds spent validating
  LINE = 0.5,         -- service seconds per request line
  FINALIZE = 5,       -- service seconds spent finalizing
  CANCEL = 5,         -- service seconds from cancelling to cancelled
  TICK = 0.02,        -- real seconds between ticks
  MAX_JOBS = 8,       -- heavy jobs running at once
  FAIL_MARKER = "lbatch-emulator:fail",
}

local cfg
local active = {}     -- id -> batch, for every batch not in a final state
local jobs = 0
local TERMINAL = require("lbatch.impl.api.service").FINAL     -- the client's own set
E.TERMINAL = TERMINAL

local function scaled(service_seconds) return service_seconds / cfg.speed end

local function line_seconds(b)
  local m = b.metadata ~= cjson.null and b.metadata and tonumber(b.metadata.emulator_line_seconds)
  return m or E.LINE
end

-- requests finished (in request order) at time t of an in_progress batch
local function processed(b, t)
  local sim = b.sim
  local n = math.floor((t - sim.t_stage) / scaled(line_seconds(b)))
  return math.max(0, math.min(sim.total, n))
end

-- a line_errors mode's line: the 1st, every+1th, 2*every+1th, ...
local function line_error_at(sim, n)
  return sim.line_errors and (n - 1) % sim.line_errors.every == 0
end

-- the failed requests among the first n (arrears and empty_output fail all)
local function failed_before(b, n)
  local sim = b.sim
  if sim.arrears or sim.empty_output then return n end
  local c = 0
  for _, ln in ipairs(sim.fail_lines or {}) do
    if ln <= n and not line_error_at(sim, ln) then c = c + 1 end
  end
  if sim.line_errors then c = c + math.ceil(n / sim.line_errors.every) end
  return c
end

-- request_counts of a batch right now (grows while it runs)
function E.counts(b)
  local sim = b.sim
  if b.status == "in_progress" then
    local n = processed(b, store.now())
    local f = failed_before(b, n)
    return { total = sim.total or 0, completed = n - f, failed = f }
  end
  return b.request_counts
end

local function stamp(b, status)
  b.status = status
  b[status .. "_at"] = math.floor(store.now())
  b.sim.t_stage = store.now()
end

---------------------------------------------------------------- models

local function text_of(content)
  if type(content) == "string" then return content end
  if type(content) == "table" then
    local parts = {}
    for _, p in ipairs(content) do
      if type(p) == "table" and type(p.text) == "string" then parts[#parts + 1] = p.text end
    end
    return table.concat(parts, " ")
  end
  return ""
end

local function tokens(s) return math.max(1, math.ceil(#s / 4)) end

local service = require "lbatch.impl.api.service"

-- A request's usage.prompt_tokens in its answer (and what token_limit
-- counts): a quarter of the prompt's bytes, rounded up, at least 1. Chat:
-- the messages' text joined by newlines (batch-test-model: 20, as the
-- documents show); embeddings: each input's, summed; completions: the
-- prompt's; responses: 8; moderations: 0.
local function prompt_tokens(endpoint, body)
  if type(body) ~= "table" then return 0 end
  if endpoint == "/v1/embeddings" or endpoint == "/embeddings" then
    local inputs = body.input
    if type(inputs) ~= "table" then inputs = { tostring(inputs or "") } end
    local n = 0
    for _, s in ipairs(inputs) do n = n + tokens(tostring(s)) end
    return n
  elseif endpoint == "/v1/chat/completions" or endpoint == "/v1/chat/ds-test"
    or endpoint == "/v4/chat/completions" or endpoint == "/chat/completions" then
    if body.model == service.TEST.model then return 20 end
    local prompt = {}
    for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
      if type(m) == "table" then prompt[#prompt + 1] = text_of(m.content) end
    end
    return tokens(table.concat(prompt, "\n"))
  elseif endpoint == "/v1/completions" then
    return tokens(tostring(body.prompt))
  elseif endpoint == "/v1/responses" then
    return 8
  elseif endpoint == "/v1/images/generations" or endpoint == "/v1/images/edits" then
    return tokens(tostring(body.prompt))
  end
  return 0
end
E.prompt_tokens = prompt_tokens

---------------------------------------------------------------- JSON answers

-- A request that asks for JSON (response_format json_object or
-- json_schema; the responses API's text.format) is answered with JSON: a
-- value of the schema's shape (every property, of its type: strings
-- "emulated", integers 7, numbers 0.5, booleans true, arrays of one item,
-- enum's and anyOf's first), or {"answer": TEXT} for json_object. A
-- request whose text holds `lbatch-emulator:answer=KIND` gets a wrong
-- answer of that kind instead: not_json (text, then JSON cut short),
-- missing (the schema's first required field left out; json_object: {}),
-- wrong_type (that field of another type). `...=KIND/N`: only the first N
-- times that same request (its line, or the real-time body, byte for
-- byte) is answered, a valid answer after: a model that slips now and
-- then, and a resubmitted line answered right. The counts are kept in
-- memory (a restart forgets them).
E.ANSWER_MARKER = "lbatch-emulator:answer="
local slips = {}      -- ngx.md5 of a request -> wrong answers it got so far

local function tab(v) if type(v) == "table" then return v end end

-- the JSON a body asks for: "json_object", or "json_schema" and the schema
local function json_wanted(body)
  local f = tab(body.response_format) or (tab(body.text) and tab(body.text.format))
  if not f then return nil end
  if f.type == "json_object" then return "json_object" end
  if f.type == "json_schema" then
    return "json_schema", tab(f.schema) or (tab(f.json_schema) and tab(f.json_schema.schema)) or {}
  end
end

-- a value of schema s's shape (local $refs followed from root)
local function example(s, root, depth)
  if type(s) ~= "table" or depth > 16 then return "emulated" end
  local ref = s["$ref"]
  if type(ref) == "string" then
    local node = root
    for part in ref:gmatch("/([^/]+)") do node = tab(node) and node[part] end
    return example(node, root, depth + 1)
  end
  if s.const ~= nil then return s.const end
  if tab(s.enum) and s.enum[1] ~= nil then return s.enum[1] end
  local any = tab(s.anyOf) or tab(s.oneOf)
  if any and any[1] ~= nil then return example(any[1], root, depth + 1) end
  local t = s.type
  if type(t) == "table" then t = t[1] end
  if t == "object" or (t == nil and tab(s.properties)) then
    local o = {}
    for k, sub in pairs(tab(s.properties) or {}) do o[k] = example(sub, root, depth + 1) end
    for _, k in ipairs(tab(s.required) or {}) do if o[k] == nil then o[k] = "emulated" end end
    return o
  end
  if t == "array" then return { example(s.items, root, depth + 1) } end
  local simple = { integer = 7, number = 0.5, boolean = true, null = cjson.null }
  if simple[t] ~= nil then return simple[t] end
  return "emulated"
end

-- the wrong kind asked for by the request's text, if it is due this time
local function slip(raw)
  local kind, times = raw:match("lbatch%-emulator:answer=([%w_]+)\\?/?(%d*)")    -- (JSON may write / as \/)
  if not kind then return nil end
  times = tonumber(times)
  if times then
    local key = ngx.md5(raw)
    if (slips[key] or 0) >= times then return nil end
    slips[key] = (slips[key] or 0) + 1
  end
  return kind
end

-- the answer's text for a body that asks for JSON, else nil
local function json_answer(body, raw, text)
  local want, schema = json_wanted(body)
  if not want then return nil end
  local kind = slip(raw)
  if kind == "not_json" then return "Sure! Here is the JSON you asked for:\n{\"answer\": " end
  local value = want == "json_object" and { answer = text } or example(schema, schema, 0)
  local first = schema and tab(schema.required) and schema.required[1]
  if type(value) == "table" and (kind == "missing" or kind == "wrong_type") then
    if want == "json_object" then value = {}
    elseif first and kind == "missing" then value[first] = nil
    elseif first then
      value[first] = type(value[first]) == "string" and 12345 or "emulated"
    end
  end
  return cjson.encode(value)
end

local function chat(body, test, id, raw)
  local last = ""
  for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and m.role == "user" then last = text_of(m.content) end
  end
  local content = test and "This is a test result."
    or ("Emulated answer (" .. body.model .. "): " .. last)
  content = not test and json_answer(body, raw, content) or content
  local message = { role = "assistant", content = content }
  if service.thinking(body) then
    message.reasoning_content = "Emulated reasoning about: " .. last
  end
  local p, c = prompt_tokens("/v1/chat/completions", body), tokens(content)
  if test then c = 6 end                 -- the documents' fixed usage for batch-test-model
  local choice = { index = 0, message = message, finish_reason = "stop" }
  if cfg.dialect == "openai" then choice.logprobs = cjson.null end
  return {
    id = "chatcmpl-" .. id, object = "chat.completion",
    created = math.floor(store.now()), model = body.model,
    choices = { choice },
    usage = { prompt_tokens = p, completion_tokens = c, total_tokens = p + c },
  }
end

-- OpenAI's other batch endpoints, emulated as simply
local function other(endpoint, body, id, raw)
  local text = "Emulated answer (" .. tostring(body.model) .. ")"
  if endpoint == "/v1/responses" then text = json_answer(body, raw, text) or text end
  local now = math.floor(store.now())
  if endpoint == "/v1/responses" then
    return { id = "resp_" .. id, object = "response", created_at = now, status = "completed", model = body.model,
             output = { { type = "message", id = "msg_" .. id, role = "assistant", status = "completed",
                          content = { { type = "output_text", text = text, annotations = {} } } } },
             usage = { input_tokens = 8, output_tokens = tokens(text), total_tokens = 8 + tokens(text) } }
  elseif endpoint == "/v1/completions" then
    return { id = "cmpl-" .. id, object = "text_completion", created = now, model = body.model,
             choices = { { text = text, index = 0, finish_reason = "stop", logprobs = cjson.null } },
             usage = { prompt_tokens = prompt_tokens(endpoint, body), completion_tokens = tokens(text),
                       total_tokens = prompt_tokens(endpoint, body) + tokens(text) } }
  end
  return { id = "modr-" .. id, model = body.model or "omni-moderation-latest",
           results = { { flagged = false, categories = { violence = false },
                         category_scores = { violence = 0.0001 } } } }
end

-- a 1x1 transparent PNG: what every emulated image is
local PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
local IMAGE_TOKENS = 272     -- OpenAI's output tokens for one low-quality 1024x1024 gpt-image-1 image

-- /v1/images/generations and /v1/images/edits: ImagesResponse (openai npm
-- 6.49.0 resources/images.d.ts): created, data [{b64_json} or {url} when
-- response_format is "url"], usage {input_tokens, output_tokens, ...}
local function images(body, id)
  local n = math.max(1, math.floor(tonumber(body.n) or 1))
  local data = {}
  for i = 1, n do
    data[i] = body.response_format == "url" and { url = ("https://images.emulator.invalid/%s-%d.png"):format(id, i) }
      or { b64_json = PNG }
  end
  local p, c = tokens(tostring(body.prompt)), IMAGE_TOKENS * n
  return { created = math.floor(store.now()), data = data, output_format = "png",
           usage = { input_tokens = p, input_tokens_details = { text_tokens = p, image_tokens = 0 },
                     output_tokens = c, total_tokens = p + c } }
end

-- /v1/videos: the Video object (resources/videos.d.ts), done; no usage
local function video(body, id)
  local now = math.floor(store.now())
  return { id = "video_" .. id, object = "video", created_at = now, completed_at = now, expires_at = now + 86400,
           status = "completed", progress = 100, model = body.model, prompt = body.prompt,
           seconds = body.seconds or "4", size = body.size or "720x1280", error = cjson.null,
           remixed_from_video_id = cjson.null }
end

local function vector(text, dim)
  local x = ngx.crc32_long(text) % 2147483648
  local v, norm = {}, 0
  for i = 1, dim do
    x = (x * 1103515245 + 12345) % 2147483648
    v[i] = x / 1073741824 - 1
    norm = norm + v[i] * v[i]
  end
  norm = math.sqrt(norm)
  for i = 1, dim do v[i] = math.floor(v[i] / norm * 1e6 + 0.5) / 1e6 end
  return v
end

local function embeddings(body)
  local inputs = body.input
  if type(inputs) ~= "table" then inputs = { tostring(inputs or "") } end
  local dim = tonumber(body.dimensions) or 1024
  local data, used = {}, prompt_tokens("/v1/embeddings", body)
  for i, s in ipairs(inputs) do
    data[i] = { object = "embedding", index = i - 1, embedding = vector(tostring(s), dim) }
  end
  return { object = "list", data = data, model = body.model,
           usage = { prompt_tokens = used, total_tokens = used } }
end

-- a result line's id and its request id: one uuid in the service's
-- output (recorded), batch_req_... and another in OpenAI's
local function line_ids()
  local uuid = util.uuid()
  if cfg.dialect == "dashscope" then return uuid, uuid, uuid end
  return "batch_req_" .. util.hex(24), "req_" .. util.hex(24), util.hex(24)
end

-- an error answer: its status and body, in OpenAI's shape
local function failure(status, code, message, typ)
  return status, { error = { message = message, type = typ or "invalid_request_error", param = cjson.null,
                             code = code } }
end

local function error_line(id, status, body)
  local lid, rid = line_ids()
  return {
    id = lid, custom_id = id,
    response = { status_code = status, request_id = rid, body = body },
    error = { code = body.error.code, message = body.error.message },
  }
end

E.ARREARS = "Access denied, please make sure your account is in good standing."

-- a line_errors line: in the output file with the status, error null (as
-- the services write a request that failed upstream)
local function upstream_error(b, req)
  local status = b.sim.line_errors.status
  local code = status == 429 and "rate_limit_exceeded" or "server_error"
  local lid, rid = line_ids()
  return {
    id = lid, custom_id = req.custom_id,
    response = { status_code = status, request_id = rid, body = { error = {
      code = code, type = status == 429 and "requests" or "server_error", param = cjson.null,
      message = status == 429 and "Rate limit reached for requests. Please try again later."
        or "The server had an error while processing your request. Sorry about that!" } } },
    error = cjson.null,
  }
end

local CHAT = { ["/v1/chat/completions"] = true, ["/v1/chat/ds-test"] = true, ["/v4/chat/completions"] = true,
               ["/chat/completions"] = true }

--- What the service answers one request to `endpoint`: a batch's line
-- (`raw` its text) or the same body sent to the real-time endpoint (`raw`
-- the request's body). The one model of both: status, body.
-- @tparam string endpoint the line's url (the real-time path as /v1/...)
-- @tparam table body the request's body
-- @tparam string raw its text
-- @tparam[opt] string id the answer's id (default a new one)
function E.answer(endpoint, body, raw, id)
  id = id or select(3, line_ids())
  if raw:find(E.FAIL_MARKER, 1, true) then
    return failure(400, "emulated_failure", "This request asked the emulator to fail (" .. E.FAIL_MARKER .. ").")
  end
  local model = body.model
  if cfg.region and type(model) == "string" and not service.serves(cfg.region, endpoint, model) then
    return failure(404, "model_not_found", ("The provided model %s is not supported by the Batch API."):format(model))
  end
  if endpoint == "/v1/embeddings" or endpoint == "/embeddings" then return 200, embeddings(body) end
  if CHAT[endpoint] then return 200, chat(body, model == service.TEST.model, id, raw) end
  if endpoint == "/v1/images/generations" or endpoint == "/v1/images/edits" then return 200, images(body, id) end
  if endpoint == "/v1/videos" then return 200, video(body, id) end
  return 200, other(endpoint, body, id, raw)
end

-- The result line of request n, and whether it succeeded (true), failed
-- (false: the error file) or failed in the output file ("output").
local function execute(b, req, raw, n)
  if b.sim.arrears then
    return error_line(req.custom_id, failure(400, "Arrearage", E.ARREARS, "Arrearage")), false
  end
  if b.sim.empty_output then
    return error_line(req.custom_id, failure(500, "internal_error",
      "The batch could not write the result of this request.", "server_error")), false
  end
  local lid, rid, cid = line_ids()
  local status, body = E.answer(b.endpoint, req.body, raw, cid)
  if status ~= 200 then return error_line(req.custom_id, status, body), false end
  if line_error_at(b.sim, n) then return upstream_error(b, req), "output" end
  return {
    id = lid, custom_id = req.custom_id,
    response = { status_code = 200, request_id = rid, body = body },
    error = cjson.null,
  }, true
end

---------------------------------------------------------------- jobs

local function yield_every(n)
  if n % 2000 == 0 then ngx.sleep(0) end
end

local function run_job(fn, b)
  jobs = jobs + 1
  b.sim.job = true
  local ok, err = ngx.timer.at(0, function(premature)
    if premature then return end
    local ok2, err2 = pcall(fn, b)
    jobs = jobs - 1
    b.sim.job = false
    if not ok2 then             -- a bug here fails the batch rather than retry forever
      ngx.log(ngx.ERR, "emulator job for ", b.id, " failed: ", err2)
      b.sim.crashed = tostring(err2)
    end
  end)
  if not ok then
    jobs = jobs - 1
    b.sim.job = false
    ngx.log(ngx.ERR, "cannot start job: ", err)
  end
end

local function running_tests(except)
  local n = 0
  for id, o in pairs(active) do
    if id ~= except and o.sim.test and o.sim.validated then n = n + 1 end
  end
  return n
end

local function validate(b)
  local fh = io.open(store.blob(b.input_file_id), "rb")
  local problems = {}
  if not fh then
    problems[1] = rules.problem("file_not_found", nil, "The input file no longer exists.", "input_file_id")
  else
    local chk = rules.checker({ endpoint = b.endpoint, limits = cfg.profile })
    local fails, used = {}, 0
    for n, text, bytes in rules.lines(fh) do
      if #problems < 1000 then chk:line(n, text, bytes, problems) else chk.lines = n end
      if text and text:find(E.FAIL_MARKER, 1, true) then fails[#fails + 1] = n end
      local okj, req = pcall(cjson.decode, text or "")
      if okj and type(req) == "table" then used = used + prompt_tokens(b.endpoint, req.body) end
      yield_every(n)
    end
    fh:close()
    chk:finish(problems)
    b.sim.total, b.sim.fail_lines, b.sim.test = chk.lines, fails, chk.test
    b.model = chk.model
    b.sim.tally = { model = chk.model, tokens = used, requests = chk.lines }
    if #problems == 0 and chk.test and running_tests(b.id) >= 2 then
      problems[1] = rules.problem("test_model_concurrency", nil,
        "At most 2 batch-test-model batches may run at once.", nil)
    end
  end
  if #problems > 0 then
    b.errors = { object = "list", data = problems }
  end
  b.sim.validated = true
end

-- ttl: the batch's output_expires_after seconds, anchored at the file's creation
local function new_file(id, filename, path, bytes, ttl)
  local f = {
    id = id, object = "file", bytes = bytes, created_at = math.floor(store.now()),
    filename = filename, purpose = "batch_output", status = "processed",
  }
  if ttl then f.expires_at = f.created_at + ttl end
  assert(os.rename(path, store.blob(id)))
  store.put_file(f)
  return f
end

-- Write the output and error files. Requests 1..done ran; the rest did
-- not (cancelled or expired), and go to the error file with `code`.
local function finalize(b)
  local sim = b.sim
  local done, code = sim.done, sim.missed_code
  local out_id = "file-batch_output-" .. util.hex(24)
  local err_id = "file-batch_output-" .. util.hex(24)
  local out_path, err_path = store.blob(out_id) .. ".part", store.blob(err_id) .. ".part"
  local out, errf = assert(io.open(out_path, "wb")), assert(io.open(err_path, "wb"))
  local nout, nerr, ok_count, fail_count = 0, 0, 0, 0
  local usage = { input_tokens = 0, output_tokens = 0 }
  local fh = io.open(store.blob(b.input_file_id), "rb")
  if fh then
    for n, text in rules.lines(fh) do
      local okj, req = pcall(cjson.decode, text or "")
      if okj and type(req) == "table" then
        local line, good
        if n <= done then
          line, good = execute(b, req, text, n)
        else
          line = {
            id = "batch_req_" .. util.hex(12), custom_id = req.custom_id, response = cjson.null,
            error = { code = code, message = code == "batch_expired"
              and "This request could not be executed before the completion window expired."
              or "This request was not executed because the batch was cancelled." },
          }
        end
        local s = cjson.encode(line) .. "\n"
        if good == "output" then
          out:write(s); nout = nout + #s; fail_count = fail_count + 1
          modes.hit("line_errors")
        elseif good then
          out:write(s); nout = nout + #s; ok_count = ok_count + 1
          local u = line.response.body.usage or {}  -- moderations have none
          usage.input_tokens = usage.input_tokens + (u.prompt_tokens or u.input_tokens or 0)
          usage.output_tokens = usage.output_tokens + (u.completion_tokens or u.output_tokens or 0)
        else
          errf:write(s); nerr = nerr + #s
          if n <= done then fail_count = fail_count + 1 end
        end
      end
      yield_every(n)
    end
    fh:close()
  end
  out:close(); errf:close()
  if nout > 0 then b.output_file_id = new_file(out_id, b.id .. "_output.jsonl", out_path, nout, sim.output_ttl).id
  else os.remove(out_path) end
  if sim.empty_output then
    b.output_file_id = cjson.null       -- null in both dialects, as the service shows it
    if done > 0 then modes.hit("empty_output") end
  end
  if nerr > 0 then b.error_file_id = new_file(err_id, b.id .. "_error.jsonl", err_path, nerr, sim.output_ttl).id
  else os.remove(err_path) end
  b.request_counts = { total = sim.total, completed = ok_count, failed = (sim.total - done) + fail_count }
  b.usage = {
    input_tokens = usage.input_tokens, input_tokens_details = { cached_tokens = 0 },
    output_tokens = usage.output_tokens, output_tokens_details = { reasoning_tokens = 0 },
    total_tokens = usage.input_tokens + usage.output_tokens,
  }
  sim.finalized = true
end

---------------------------------------------------------------- callback

local function is_loopback(host)
  return host == "localhost" or host:match("^127%.%d+%.%d+%.%d+$") or host == "[::1]"
end

local function notify(b)
  local url = type(b.metadata) == "table" and b.metadata.ds_batch_finish_callback
  if type(url) ~= "string" then return end
  local host = url:match("^https?://([^/:]+)")
  if not host or not is_loopback(host) then return end
  local payload = cjson.encode(util.public(b))
  ngx.timer.at(0, function() require("emu.webhooks").post(url, nil, payload) end)
end

---------------------------------------------------------------- ticker

E.finished = {}     -- batch id -> the wall-clock time it became final (for specs)

local function finish(b, status)
  stamp(b, status)
  E.finished[b.id] = ngx.now()
  if cfg.dialect == "dashscope" then        -- as the service records them
    if status == "failed" and not b.in_progress_at then b.failed_at = b.created_at end
    if status == "completed" then b.finalizing_at = b.completed_at end
    if status == "cancelled" then b.cancelled_at = b.cancelling_at or b.cancelled_at end
  end
  active[b.id] = nil
  store.put_batch(b)
  notify(b)
  require("emu.webhooks").batch_ended(b)
end

local function begin_finalize(b, status, done, code)
  b.sim.done, b.sim.missed_code, b.sim.finalized = done, code, false
  local f = failed_before(b, done)
  b.request_counts = { total = b.sim.total or 0, completed = done - f, failed = f }
  if status ~= b.status then stamp(b, status) end
  store.put_batch(b)
end

-- token_limit: what a batch counts against is the enqueued work of its
-- model: the batches in validating, in_progress or finalizing (a
-- validating one only when created before `b`, so a later batch never
-- fails an earlier one), `b` itself not included
local ENQUEUED = { validating = true, in_progress = true, finalizing = true, expiring = true }

function E.enqueued(model, b)
  local pos = b and store.batch_pos[b.id] or math.huge
  local used, requests = 0, 0
  for id, o in pairs(active) do
    local t = o.sim.tally
    if o ~= b and t and t.model == model and ENQUEUED[o.status]
      and (o.status ~= "validating" or (store.batch_pos[id] or 0) < pos) then
      used = used + t.tokens
      if o.endpoint == "/v1/embeddings" then requests = requests + t.requests end
    end
  end
  return used, requests
end

-- The token_limit message when a batch of `endpoint` with tally `t`
-- ({model, tokens, requests}) would go over the limit, else nil.
function E.over_limit(endpoint, t, b)
  local lim = modes.get("token_limit")
  if not lim or not t or type(t.model) ~= "string" then return nil end
  local used, requests = E.enqueued(t.model, b)
  local tail = " Please try again once some in_progress batches have been completed."
  if lim.tokens and used + t.tokens > lim.tokens then
    return ("Enqueued token limit reached for %s in organization org-emulator. Limit: %s enqueued tokens.")
      :format(t.model, modes.commas(lim.tokens)) .. tail
  end
  if lim.requests and endpoint == "/v1/embeddings" and requests + t.requests > lim.requests then
    return ("Enqueued request limit reached for %s in organization org-emulator. Limit: %s enqueued requests.")
      :format(t.model, modes.commas(lim.requests)) .. tail
  end
end

-- A file's model, prompt tokens and requests (token_limit at create), read
-- once per file and endpoint: files do not change
local tallies = {}
function E.tally(fid, endpoint)
  local key = fid .. " " .. endpoint
  if tallies[key] then return tallies[key] end
  local fh = io.open(store.blob(fid), "rb")
  if not fh then return nil end
  local t = { tokens = 0, requests = 0 }
  for n, text in rules.lines(fh) do
    t.requests = n
    local okj, req = pcall(cjson.decode, text or "")
    if okj and type(req) == "table" then
      if t.model == nil and type(req.body) == "table" then t.model = req.body.model end
      t.tokens = t.tokens + prompt_tokens(endpoint, req.body)
    end
    yield_every(n)
  end
  fh:close()
  tallies[key] = t
  return t
end

-- hold: service seconds a batch in `status` stays longer (counted once a batch)
local function held(b, status)
  local h = modes.get("hold")
  if not h or h.status ~= status then return 0 end
  if b.sim.held ~= status then b.sim.held = status; modes.hit("hold") end
  return h.seconds
end

local function step(b, now)
  local sim = b.sim
  if sim.job then return end
  if sim.crashed then
    b.errors = { object = "list", data = { { code = "internal_error", line = cjson.null,
      message = "The emulator could not run this batch: " .. sim.crashed } } }
    b.request_counts = b.request_counts or { total = sim.total or 0, completed = 0, failed = 0 }
    sim.crashed = nil
    return finish(b, "failed")
  end
  local s = b.status
  if (s == "validating" or s == "in_progress") and sim.t_expires and now >= sim.t_expires then
    local done = s == "in_progress" and processed(b, now) or 0
    sim.total = sim.total or 0
    begin_finalize(b, "expiring", done, "batch_expired")
    return
  end
  if s == "validating" then
    if not sim.validated then
      if jobs < E.MAX_JOBS then run_job(validate, b) end
    elseif now >= sim.t_stage + scaled(E.VALIDATE + held(b, "validating")) then
      local over = not b.errors and E.over_limit(b.endpoint, sim.tally, b)
      if over then
        b.errors = { object = "list", data = { { code = "token_limit_exceeded", message = over,
                                                  line = cjson.null, param = cjson.null } } }
        b.request_counts = { total = 0, completed = 0, failed = 0 }
        modes.hit("token_limit")
        finish(b, "failed")
      elseif b.errors then
        -- the service counts nothing for a file it refused
        b.request_counts = { total = cfg.dialect == "dashscope" and 0 or sim.total or 0, completed = 0, failed = 0 }
        finish(b, "failed")
      else
        b.request_counts = { total = sim.total, completed = 0, failed = 0 }
        stamp(b, "in_progress")
        -- the service's in_progress_at is its created_at (both recorded batches)
        if cfg.dialect == "dashscope" then b.in_progress_at = b.created_at end
        store.put_batch(b)
      end
    end
  elseif s == "in_progress" then
    if processed(b, now) >= sim.total then begin_finalize(b, "finalizing", sim.total, nil) end
  elseif s == "finalizing" or s == "cancelling" or s == "expiring" then
    if not sim.finalized then
      if jobs < E.MAX_JOBS then run_job(finalize, b) end
    else
      local wait = s == "cancelling" and E.CANCEL or s == "finalizing" and E.FINALIZE + held(b, "finalizing") or 0
      if now >= sim.t_stage + scaled(wait) then
        finish(b, s == "finalizing" and "completed" or s == "cancelling" and "cancelled" or "expired")
      end
    end
  end
end

local function tick()
  local now = store.now()
  for _, b in pairs(active) do step(b, now) end
end

-- The internal "expiring" stage shows as in_progress to clients.
function E.visible_status(b)
  return b.status == "expiring" and "in_progress" or b.status
end

-- E.peak: the most batches not yet final at once (the stats' running_peak:
-- a spec reads how many ran at once without racing them to their end)
E.peak = 0
function E.track(b)
  active[b.id] = b
  local n = 0
  for _ in pairs(active) do n = n + 1 end
  if n > E.peak then E.peak = n end
end

-- batches not yet final; with owner, only that account's
function E.running(owner)
  local n = 0
  for _, b in pairs(active) do
    if not owner or b.sim.owner == owner then n = n + 1 end
  end
  return n
end

function E.cancel(b)
  local now = store.now()
  local done = 0
  if b.status == "in_progress" then done = processed(b, now) end
  b.sim.total = b.sim.total or 0
  begin_finalize(b, "cancelling", done, "batch_cancelled")
end

function E.start(config)
  cfg = config
  for _, id in ipairs(store.batch_order) do
    local b = store.batches[id]
    if not TERMINAL[b.status] then
      b.sim.job = false
      if b.status == "validating" then b.sim.validated = false end
      if b.status ~= "validating" and b.status ~= "in_progress" then b.sim.finalized = false end
      active[id] = b
    end
  end
  local function loop(premature)
    while not premature and not ngx.worker.exiting() do
      local ok, err = pcall(tick)
      if not ok then ngx.log(ngx.ERR, "emulator tick: ", err) end
      ngx.sleep(E.TICK)
    end
  end
  assert(ngx.timer.at(0, loop))
end

E.scaled = scaled

return E
