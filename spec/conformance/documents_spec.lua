-- The official OpenAI documents' example objects (the x-oaiMeta examples
-- of emulator/conformance/openapi, taken from the JSON here, not copied)
-- held against the emulator's answers in the openai dialect: the same keys
-- at every level, the same JSON types, the same constant values, and the
-- content type the description gives each answer.
--
-- Where an example and its own schema disagree, the schema wins (the
-- conformance spec holds the emulator to it through Prism):
--   * a null in the example on a field the schema marks nullable: null or
--     the schema's type; on one it does not (the Batch's *_at, errors,
--     output_file_id: plain integers and strings there): left out, or the
--     schema's type, never null;
--   * a key the example leaves out: allowed if the schema requires it
--     (a file's status) or the object's own example shows it (the endpoint
--     examples predate a batch's model and usage).
local H = require "helper"
local cjson = require "cjson"

local DOC = cjson.decode((assert(H.read(H.root .. "/emulator/conformance/openapi/batch-files-v1.patched.json"))))

-- the documents write their examples as JSON with trailing commas and a
-- `{ ... }` for "more of the same"
local function example(text)
  text = text:gsub("{%s*%.%.%.%s*},?", "")
  return cjson.decode((text:gsub(",(%s*[}%]])", "%1")))
end

local function resolve(s)
  while s and s["$ref"] do
    s = DOC.components.schemas[s["$ref"]:match("([^/]+)$")]
  end
  return s
end

-- a schema's nullability, and the schema itself (an anyOf's non-null member)
local function unwrap(s)
  s = resolve(s) or {}
  local nullable = s.nullable == true
  if type(s.type) == "table" then
    for _, t in ipairs(s.type) do if t == "null" then nullable = true end end
  end
  if s.anyOf then
    local other
    for _, m in ipairs(s.anyOf) do
      m = resolve(m)
      if m.type == "null" then nullable = true else other = m end
    end
    s = other or s
  end
  return s, nullable
end

local function set(list)
  local t = {}
  for _, k in ipairs(list or {}) do t[k] = true end
  return t
end

local jtype = H.jtype

local SCHEMA_TYPES = { integer = { integer = true }, number = { integer = true, number = true },
  string = { string = true }, boolean = { boolean = true }, object = { object = true, empty = true },
  array = { array = true, empty = true } }

local function of_schema_type(s, v)
  local types = type(s.type) == "table" and s.type or { s.type }
  for _, t in ipairs(types) do
    if SCHEMA_TYPES[t] and SCHEMA_TYPES[t][jtype(v)] then return true end
  end
  return false
end

-- the differences between an example and the emulator's answer, as the
-- head of this file says; `same`: keys whose values (all of them, for an
-- object) must be the example's, besides the schema's constants
local function differences(want, got, schema, same, path, out, fixed)
  out, path = out or {}, path or ""
  local s, nullable = unwrap(schema)
  local key = path:match("([%w_]+)$") or ""
  fixed = fixed or same[key]
  if want == cjson.null then
    if got == nil then
      if nullable then out[#out + 1] = path .. ": null (nullable) in the example, left out by the emulator" end
    elseif got == cjson.null then
      if not nullable then out[#out + 1] = path .. ": null, which the schema does not allow" end
    elseif not of_schema_type(s, got) then
      out[#out + 1] = ("%s: %s, not of the schema's type"):format(path, jtype(got))
    end
    return out
  end
  local wt, gt = jtype(want), got == nil and "absent" or jtype(got)
  if wt ~= gt then
    out[#out + 1] = ("%s: %s in the example, %s from the emulator"):format(path, wt, gt)
  elseif wt == "object" then
    local props = s.properties or {}
    local own = s["x-oaiMeta"] and s["x-oaiMeta"].example and example(s["x-oaiMeta"].example) or {}
    local required = set(s.required)
    for k, w in pairs(want) do
      differences(w, got[k], props[k] or s.additionalProperties or {}, same, path .. "." .. k, out, fixed)
    end
    for k in pairs(got) do
      if want[k] == nil and not required[k] and own[k] == nil then
        out[#out + 1] = ("%s.%s: in neither the example nor the schema's required"):format(path, k)
      end
    end
  elseif wt == "array" then
    for i, g in ipairs(got) do     -- every item as the example's first
      differences(want[1], g, s.items or {}, same, path .. "[" .. i .. "]", out, fixed)
    end
  else
    local const = s.enum and #s.enum == 1 or s["x-stainless-const"]
    if (const or fixed) and want ~= got then
      out[#out + 1] = ("%s: %s in the example, %s from the emulator"):format(path, tostring(want), tostring(got))
    end
  end
  return out
end

-- an operation's example answer, its schema and its content types
local function operation(path, method)
  local op = DOC.paths[path][method]
  local ok = op.responses["200"].content
  local types, schema = {}, nil
  for t, c in pairs(ok) do
    types[t] = true
    if t == "application/json" then schema = c.schema end
  end
  local ex = op["x-oaiMeta"].examples
  return { example = ex.response and example(ex.response), schema = schema, types = types, request = ex.request }
end

local function object_example(name)
  return { example = example(DOC.components.schemas[name]["x-oaiMeta"].example),
           schema = { ["$ref"] = "#/components/schemas/" .. name }, types = { ["application/json"] = true } }
end

describe("the emulator (openai dialect) beside the OpenAI documents' examples, field by field", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200, dialect = "openai" })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  local function raw(method, path, opts)
    local status, body, headers = H.json(method, emu.base .. path, opts)
    assert.are.equal(200, status, type(body) == "string" and body or cjson.encode(body))
    return body, headers["content-type"]
  end

  local function check(op, got, got_type, same)
    assert.are.same({}, differences(op.example, got, op.schema, set(same)))
    if got_type then assert.is_true(op.types[got_type] or false, got_type) end
  end

  -- the curl of an upload example: its -F fields, the file made here
  local function upload_as(op, text)
    local form = {}
    for k, v in op.request.curl:gmatch("%-F ([%w_%[%]]+)=\"?([^\"%s]+)\"?") do
      if k == "file" then
        local path = H.mkdir(dir .. "/" .. H.now() * 1e6) .. "/" .. v:gsub("^@", "", 1)
        H.write(path, text)
        v = "@" .. path
      end
      form[#form + 1] = k .. "=" .. v
    end
    return raw("POST", "/files", { form = form })
  end

  local function until_status(id, want)
    local b = H.wait_status(emu, id, want)
    assert.are.equal(want, b.status)
    return b
  end

  it("files: upload (the example's fields), retrieve, list, delete, the file object", function()
    local up_op = operation("/v1/files", "post")
    local f, ct = upload_as(up_op, H.read(H.requests(dir .. "/r.jsonl", 2)))
    check(up_op, f, ct, { "filename", "purpose" })
    assert.are.equal(2592000, f.expires_at - f.created_at)
    local got
    got, ct = raw("GET", "/files/" .. f.id)
    check(operation("/v1/files/{file_id}", "get"), got, ct, { "filename", "purpose" })
    check(object_example("OpenAIFile"), got, ct)
    upload_as(up_op, "{}\n")
    got, ct = raw("GET", "/files?purpose=" .. f.purpose)
    assert.is_true(#got.data >= 2)
    check(operation("/v1/files", "get"), got, ct)
    got, ct = raw("DELETE", "/files/" .. f.id)
    check(operation("/v1/files/{file_id}", "delete"), got, ct, { "deleted" })
  end)

  it("batches: create, retrieve completed, cancel, list; the batch object; the content's type", function()
    local create_op = operation("/v1/batches", "post")
    local sent = cjson.decode(create_op.request.curl:match("%-d '(.-)'"))
    local batch = object_example("Batch").example
    -- the input: the batch object example's endpoint and model, one line failing (an error file)
    local function input(endpoint, n)
      local lines = {}
      for i = 1, n do
        local body = endpoint == "/v1/completions" and { model = batch.model, prompt = "hi " .. i }
          or { model = batch.model, messages = { { role = "user", content = "hi " .. i } } }
        if i == n then body.user = "lbatch-emulator:fail" end
        lines[i] = cjson.encode({ custom_id = "r" .. i, method = "POST", url = endpoint, body = body })
      end
      local path = H.mkdir(dir .. "/" .. H.now() * 1e6) .. "/input.jsonl"
      H.write(path, table.concat(lines, "\n") .. "\n")
      return raw("POST", "/files", { form = { "purpose=batch", "file=@" .. path } }).id
    end
    local function create(endpoint, meta, n)
      return raw("POST", "/batches", { json = { input_file_id = input(endpoint, n), endpoint = endpoint,
                                                completion_window = sent.completion_window, metadata = meta } })
    end

    local b, ct = create(sent.endpoint, create_op.example.metadata, 3)
    check(create_op, b, ct, { "status", "endpoint", "completion_window", "metadata" })

    -- cancelled while in progress (the emulator's own knob holds it there, set aside after)
    local cancel_op = operation("/v1/batches/{batch_id}/cancel", "post")
    local meta = { emulator_line_seconds = "100000" }
    for k, v in pairs(cancel_op.example.metadata) do meta[k] = v end
    local c = create(cancel_op.example.endpoint, meta, 3)
    until_status(c.id, "in_progress")
    local got
    got, ct = raw("POST", "/batches/" .. c.id .. "/cancel")
    got.metadata.emulator_line_seconds = nil
    check(cancel_op, got, ct, { "status", "endpoint", "metadata" })

    local retrieve_op = operation("/v1/batches/{batch_id}", "get")
    local ids = {}
    for i = 1, 2 do
      b = create(batch.endpoint, batch.metadata, 4)
      ids[i] = b.id
      until_status(b.id, "completed")
    end
    got, ct = raw("GET", "/batches/" .. b.id)
    check(retrieve_op, got, ct, { "status", "endpoint", "completion_window" })
    check(object_example("Batch"), got, ct, { "status", "endpoint", "model", "metadata" })

    got, ct = raw("GET", "/batches?limit=2")
    local list_op = operation("/v1/batches", "get")
    check(list_op, got, ct, { "status", "has_more" })
    assert.are.same({ ids[2], ids[1] }, { got.data[1].id, got.data[2].id })

    local content_op = operation("/v1/files/{file_id}/content", "get")
    local _, _, headers = H.http("GET", emu.base .. "/files/" .. got.data[1].output_file_id .. "/content")
    assert.is_true(content_op.types[headers["content-type"]] or false, headers["content-type"])
  end)
end)
