-- The Files API: upload (multipart, spooled to disk by nginx; Together's
-- three steps: presign, the signed PUT, preprocess), list, get, delete and
-- content.
local respond = require "emu.respond"
local store = require "emu.store"
local util = require "emu.util"
local multipart = require "emu.multipart"
local admin = require "emu.admin"
local modes = require "emu.modes"
local batches = require "emu.batches"
local providers = require "emu.providers"

local F = {}
local cfg

-- ids as the service's (spec/fixtures/recorded): a prefix by purpose and
-- 24 hex digits, file-batch-61875e1242854691b8bfd17d, file-fe-5d5eb068...
local PREFIX = { ["file-extract"] = "file-fe-" }
function F.new_id(purpose) return (PREFIX[purpose] or "file-batch-") .. util.hex(24) end

local MAX_UPLOAD = 500 * 1024 * 1024
local json, err = respond.json, respond.err

function F.init(config) cfg = config end

local function public(f)
  return { id = f.id, object = "file", bytes = f.bytes, created_at = f.created_at,
           filename = f.filename, purpose = f.purpose, status = f.status, expires_at = f.expires_at,
           file_type = f.file_type }
end

-- expires_after[anchor] and expires_after[seconds] (OpenAI): seconds, or
-- nil and an error response
local function expiry(fields)
  local anchor, seconds = fields["expires_after[anchor]"], fields["expires_after[seconds]"]
  if anchor == nil and seconds == nil then return nil end
  local s = tonumber(seconds)
  if anchor ~= "created_at" or not s or s < 3600 or s > 2592000 or s ~= math.floor(s) then
    return nil, err(400, "invalid_expires_after",
      "expires_after needs anchor \"created_at\" and seconds between 3600 and 2592000.", "expires_after")
  end
  return s
end
F.expiry = expiry

function F.upload()
  local quota = batches.insufficient_quota()
  if quota then return quota end
  local boundary = multipart.boundary(ngx.var.http_content_type)
  if not boundary and providers.presigned() then return F.presign() end
  if not boundary then
    return err(400, "invalid_request", "Content-Type must be multipart/form-data with a boundary.")
  end
  ngx.req.read_body()
  local body_file = ngx.req.get_body_file()
  local tmp
  if not body_file then
    -- small bodies may stay in memory; spool them so there is one path
    local data = ngx.req.get_body_data() or ""
    tmp = store.blob("upload-" .. util.hex(12) .. ".body")
    local fh = assert(io.open(tmp, "wb"))
    fh:write(data)
    fh:close()
    body_file = tmp
  end
  local part = store.blob("upload-" .. util.hex(24)) .. ".part"
  local res, msg = multipart.parse(body_file, boundary, part, MAX_UPLOAD)
  if tmp then os.remove(tmp) end
  if not res then
    os.remove(part)
    if msg == "too_large" then
      return err(413, "file_too_large", "The file is larger than 500 MB.", "file")
    end
    return err(400, "invalid_multipart", "Malformed multipart body: " .. msg .. ".")
  end
  if not res.file then
    return err(400, "missing_file", "The multipart body has no 'file' part.", "file")
  end
  admin.note("form", res.fields)
  local purpose = res.fields.purpose
  if purpose == nil then
    os.remove(part)
    return err(400, "missing_purpose", "The 'purpose' field is required.", "purpose")
  end
  local allowed = cfg.dialect == "dashscope" and { batch = true, ["file-extract"] = true }
    or { batch = true, assistants = true, ["fine-tune"] = true, vision = true, user_data = true, evals = true }
  allowed[providers.purpose()] = true
  if not allowed[purpose] then
    os.remove(part)
    return err(400, "invalid_purpose", ("purpose %q is not supported; use \"batch\"."):format(purpose), "purpose")
  end
  local ttl, e = expiry(res.fields)
  if e then os.remove(part) return e end
  require("emu.modes").commit_delay()
  local id = F.new_id(purpose)
  local f = {
    id = id, object = "file", bytes = res.file.bytes, created_at = math.floor(store.now()),
    filename = res.file.filename, purpose = purpose, status = "processed",
  }
  if ttl then f.expires_at = f.created_at + ttl end
  assert(os.rename(part, store.blob(id)))
  store.put_file(f)
  batches.made(id)
  return json(200, public(f))
end

-- ------------------------------------------------------------ Together's upload
-- together-ai (npm 0.52.0) src/lib/upload.ts: POST {base}/files?file_name=
-- &file_type=&purpose= (the same fields urlencoded in the body) with
-- redirect "manual", a 302 wanted, its Location and X-Together-File-Id
-- read; PUT the bytes to Location (Content-Type application/octet-stream,
-- no key), 200 wanted; then GET /files/{id}. together-py
-- src/together/lib/resources/files.py (UploadManager) sends the fields as a
-- JSON body and ends with POST /files/{id}/preprocess instead. Both answer
-- the file; a file whose bytes never came cannot be a batch's input.

local FILE_TYPES = { jsonl = true, parquet = true, csv = true }
local MAX_FIELD = 64 * 1024

-- the fields of the first step: the query, then an urlencoded or JSON body
local function presign_fields()
  local fields = ngx.req.get_uri_args(20)
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  local path = not data and ngx.req.get_body_file()
  if path then
    local fh = io.open(path, "rb")
    data = fh and fh:read(MAX_FIELD)
    if fh then fh:close() end
  end
  if data and data ~= "" then
    local ok, obj = pcall(require("cjson").decode, data)
    if not ok or type(obj) ~= "table" then obj = ngx.decode_args(data, 20) end
    for k, v in pairs(obj) do if fields[k] == nil then fields[k] = v end end
  end
  return fields
end
function F.presign()
  local fields = presign_fields()
  admin.note("form", fields)
  local purpose, name, ftype = fields.purpose, fields.file_name, fields.file_type or "jsonl"
  if type(name) ~= "string" or name == "" then
    return err(400, "missing_file_name", "file_name is required.", "file_name")
  end
  if purpose ~= providers.purpose() and purpose ~= "fine-tune" and purpose ~= "eval" then
    return err(400, "invalid_purpose", ("purpose %q is not supported; use %q."):format(tostring(purpose),
      providers.purpose()), "purpose")
  end
  if not FILE_TYPES[ftype] then
    return err(400, "invalid_file_type", "file_type must be jsonl, parquet or csv.", "file_type")
  end
  local id = "file-" .. util.uuid()
  local f = { id = id, object = "file", bytes = 0, created_at = math.floor(store.now()),
              filename = name:match("([^/\\]+)$") or name, purpose = purpose, status = "pending",
              file_type = ftype, signature = util.hex(32) }
  store.put_file(f)
  local host = ngx.var.http_host or ("127.0.0.1:" .. cfg.port)
  return { status = 302, body = "", headers = {
    Location = ("%s://%s/_presigned/%s?signature=%s"):format(cfg.scheme or "http", host, id, f.signature),
    ["X-Together-File-Id"] = id } }
end

-- the signed PUT: the bytes, streamed from nginx's body file into the blob
local function unknown()
  return err(404, "unknown_url", ("Invalid URL (%s %s)"):format(ngx.req.get_method(), ngx.var.uri))
end

function F.put_presigned(id)
  if not providers.presigned() then return unknown() end
  local f = store.files[id]
  if not f or f.status ~= "pending" or ngx.var.arg_signature ~= f.signature then
    return err(403, "signature_does_not_match", "The request signature does not match, or the URL was used.")
  end
  -- a signed URL takes no other credentials (S3 answers 400 "Only one auth
  -- mechanism allowed"): a client that sends its key there leaks it
  if ngx.var.http_authorization or ngx.var.http_api_key then
    return err(400, "invalid_argument", "Only one auth mechanism allowed: the URL is signed, "
      .. "so no Authorization header.")
  end
  ngx.req.read_body()
  local src = ngx.req.get_body_file()
  local data = not src and (ngx.req.get_body_data() or "")
  local tmp = store.blob(id) .. ".part"
  local out = assert(io.open(tmp, "wb"))
  local bytes = 0
  if data then
    out:write(data)
    bytes = #data
  else
    local fh = assert(io.open(src, "rb"))
    while true do
      local chunk = fh:read(1024 * 1024)
      if not chunk then break end
      out:write(chunk)
      bytes = bytes + #chunk
    end
    fh:close()
  end
  out:close()
  if bytes > MAX_UPLOAD then
    os.remove(tmp)
    return err(413, "file_too_large", "The file is larger than 500 MB.", "file")
  end
  assert(os.rename(tmp, store.blob(id)))
  f.bytes, f.status, f.signature = bytes, "uploaded", nil
  store.put_file(f)
  batches.made(id)
  return { status = 200, body = "" }
end

function F.preprocess(id)
  if not providers.presigned() then return unknown() end
  local f = store.files[id]
  if not f then return err(404, "file_not_found", ("No such file: %s"):format(id), "file_id") end
  if f.status == "pending" then
    return err(400, "file_not_uploaded", ("File %s has no bytes yet: PUT them to its upload URL."):format(id),
      "file_id")
  end
  f.status = "processed"
  store.put_file(f)
  return json(200, public(f))
end

function F.list(args)
  local limit, e = respond.int_arg(args, "limit", 10000, 1, 10000)
  if not limit then return e end
  local order = args.order or "desc"
  if order ~= "asc" and order ~= "desc" then
    return err(400, "invalid_parameter", "order must be asc or desc.", "order")
  end
  -- the service's filters (recorded: create_after=20250101&create_before=20251101), in UTC+8
  local window, bad = util.list_window(args)
  if not window then
    return err(400, "invalid_parameter", bad .. " must be yyyyMMdd or yyyyMMddHHmmss (UTC+8).", bad)
  end
  local after_t, before_t = window.create_after, window.create_before
  local ids = store.file_order
  local from, to, dir = #ids, 1, -1
  if order == "asc" then from, to, dir = 1, #ids, 1 end
  local items, started = {}, args.after == nil
  local has_more = false
  for i = from, to, dir do
    local f = store.files[ids[i]]
    if f then
      if started and (not args.purpose or args.purpose == f.purpose)
        and (not after_t or f.created_at >= after_t) and (not before_t or f.created_at <= before_t) then
        if #items == limit then has_more = true break end
        items[#items + 1] = public(f)
      elseif f.id == args.after then
        started = true
      end
    end
  end
  return respond.page(items, has_more, false, cfg.dialect == "dashscope")
end

local function find(id)
  local f = store.files[id]
  if not f then return nil, err(404, "file_not_found", ("No such file: %s"):format(id), "file_id") end
  return f
end

function F.get(id)
  local f, e = find(id)
  return e or json(200, public(f))
end

function F.delete(id)
  local _, e = find(id)
  if e then return e end
  store.delete_file(id)
  return json(200, { id = id, object = "file", deleted = true })
end

local cut_once = {}        -- file id -> its one cut download happened

function F.content(id)
  local f, e = find(id)
  if e then return e end
  if cfg.dialect == "dashscope" and f.purpose ~= "batch_output" then
    return err(400, "file_not_downloadable",
      "Only output and error files of batches can be downloaded.", "file_id")
  end
  -- cut_download: the first download of each file while it is on is cut
  local cut = modes.get("cut_download")
  if cut and not cut_once[id] then
    cut_once[id] = true
    modes.hit("cut_download")
    return { status = 200, file = f.id, bytes = f.bytes, cut = cut.bytes }
  end
  return { status = 200, file = f.id, bytes = f.bytes }
end

return F
