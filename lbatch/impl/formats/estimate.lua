--- Estimate request files before they are sent: requests per model and
-- endpoint, approximate input tokens, the most output tokens the requests
-- allow, and their cost at batch prices (`lbatch estimate`).
--
--    local rep = assert(estimate.files({ "requests.jsonl" }, { prices = "prices.json" }))
--    print(rep.totals.input_tokens, rep.totals.input_cost)
--
-- `jsonl.estimate` is `estimate.files`.
-- @module lbatch.impl.formats.estimate
local json = require "lbatch.json"
local rules = require "lbatch.impl.formats.rules"
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"
local cost = require "lbatch.impl.formats.cost"

local safe_decode = require("cjson.safe").decode
local find = string.find
local M = {}


-- UTF-8 sequences counted as one token each: CJK symbols and punctuation,
-- kana, CJK ideographs (U+3000-U+9FFF), Hangul syllables (U+AC00-U+D7FF),
-- compatibility ideographs (U+F900-U+FAFF), fullwidth forms (U+FF00-U+FFEF)
-- and the supplementary ideographs (U+20000-U+3FFFF)
local CJK = {
  "[\227-\233][\128-\191][\128-\191]", "\234[\176-\191][\128-\191]", "[\235\236][\128-\191][\128-\191]",
  "\237[\128-\159][\128-\191]", "\239[\164-\171][\128-\191]", "\239[\188-\191][\128-\191]",
  "\240[\160-\191][\128-\191][\128-\191]",
}
local gsub = string.gsub

-- add a string's characters to m: cjk (CJK characters), other (the rest)
local function count_text(m, s)
  if type(s) ~= "string" or s == "" then return end
  local cont = select(2, gsub(s, "[\128-\191]", ""))   -- UTF-8 continuation bytes
  local chars, cjk = #s - cont, 0
  if cont > 0 then
    for _, p in ipairs(CJK) do cjk = cjk + select(2, gsub(s, p, "")) end
  end
  m.cjk_chars, m.other_chars = m.cjk_chars + cjk, m.other_chars + chars - cjk
end

-- a message's content: a string, or a list of parts ({type = "text", text})
local function count_content(m, content)
  if type(content) == "string" then return count_text(m, content) end
  if type(content) ~= "table" then return end
  for _, part in ipairs(content) do
    if type(part) == "string" then count_text(m, part)
    elseif type(part) == "table" then count_text(m, part.text) end
  end
end

-- the text a request sends: messages' content, input (a string, a list of
-- strings, or of messages: the responses API's too), prompt (a string or a
-- list of strings), instructions (the responses API's system text)
local function count_body(m, body)
  count_text(m, body.instructions)
  if type(body.messages) == "table" then
    for _, msg in ipairs(body.messages) do
      if type(msg) == "table" then count_content(m, msg.content) end
    end
  end
  for _, field in ipairs({ "input", "prompt" }) do
    local v = body[field]
    if type(v) == "string" then count_text(m, v)
    elseif type(v) == "table" then
      for _, item in ipairs(v) do
        if type(item) == "table" then count_content(m, item.content ~= nil and item.content or { item })
        else count_text(m, item) end
      end
    end
  end
end

-- endpoints that answer without output tokens
local NO_OUTPUT = { ["/v1/embeddings"] = true, ["/v1/moderations"] = true }
-- endpoints whose answers are not priced by a token count a line can bound
-- (OpenAI's pricing page: images per image or per image token, by size and
-- quality; videos per second of video): their prompt is counted, their
-- output never, so max_cost refuses them (max_cost_unknown)
M.NOT_BY_TOKENS = {
  ["/v1/images/generations"] = "images are priced per image (by model, size and quality), not per token",
  ["/v1/images/edits"] = "images are priced per image (by model, size and quality, the input images too), "
    .. "not per token",
  ["/v1/videos"] = "videos are priced per second of video, not per token",
}
local MAX_OUTPUT = { "max_tokens", "max_completion_tokens", "max_output_tokens" }

-- the prices table checked: prices, or nil and an invalid error
local function check_prices(prices, name)
  local function bad(msg)
    return nil, errors.new({ kind = "invalid", code = "invalid_prices", param = "prices",
      message = ("prices %s: %s"):format(name, msg) })
  end
  if type(prices) ~= "table" then return bad("must be a JSON object of models") end
  for model, p in pairs(prices) do
    if type(model) ~= "string" then return bad("must be a JSON object of models, not a list") end
    if type(p) ~= "table" then return bad(("%q must be an object {\"input\": P, \"output\": P}"):format(model)) end
    for _, k in ipairs({ "input", "output" }) do
      local v = p[k]
      if v ~= nil and v ~= json.null and (type(v) ~= "number" or v ~= v or v < 0 or v == math.huge) then
        return bad(("%q.%s must be a number (currency units per million tokens)"):format(model, k))
      end
    end
    if type(p.input) ~= "number" and type(p.output) ~= "number" then
      return bad(("%q has neither an input nor an output price"):format(model))
    end
  end
  return prices
end

--- Prices as `files` takes them, checked: a table `{[model] = {input =
-- P, output = P}}` or the path of a JSON file of it.
-- @param prices a table, a path or nil
-- @treturn ?table the prices (nil for none), or nil and an `io` or `invalid` error
function M.prices(prices)
  local given = prices
  if type(prices) == "string" then
    local fh, msg = io.open(prices, "rb")
    if not fh then return nil, errors.io("cannot read", prices, msg) end
    local text, rerr = fh:read("*a")
    fh:close()
    if not text then return nil, errors.io("cannot read", given, rerr) end
    local why
    prices, why = safe_decode(text)
    if prices == nil then
      return nil, errors.new({ kind = "invalid", code = "invalid_prices", param = "prices",
        message = ("prices %s: not JSON (%s)"):format(given, tostring(why)) })
    end
  end
  if prices == nil then return nil end
  return check_prices(prices, type(given) == "string" and given or "table")
end

--- The method of `estimate`'s token counts, in words.
M.METHOD = "input tokens are approximate: 1 per CJK character, 1 per 4 other characters "
  .. "(rounded up per model); output tokens are at most the sum of max_tokens (or max_completion_tokens, "
  .. "max_output_tokens); images and videos are not priced by tokens: their output is unknown"

-- one request counted into its model's entry of `models`
local function count_request(models, req, body)
  local model = type(body.model) == "string" and body.model or "(default)"
  local url = type(req.url) == "string" and req.url or "(none)"
  local m = models[model]
  if not m then
    m = { requests = 0, endpoints = {}, cjk_chars = 0, other_chars = 0, output_tokens_max = 0,
          with_max_tokens = 0 }
    models[model] = m
  end
  m.requests = m.requests + 1
  m.endpoints[url] = (m.endpoints[url] or 0) + 1
  count_body(m, body)
  if M.NOT_BY_TOKENS[url] then
    m.not_by_tokens = (m.not_by_tokens or 0) + 1
  elseif NO_OUTPUT[url] then
    m.with_max_tokens = m.with_max_tokens + 1
  else
    for _, k in ipairs(MAX_OUTPUT) do
      local v = body[k]
      if type(v) == "number" and v >= 0 then
        m.output_tokens_max = m.output_tokens_max + math.floor(v)
        m.with_max_tokens = m.with_max_tokens + 1
        break
      end
    end
  end
end

-- one file's requests counted into `models`: its entry {path, lines,
-- requests, skipped}, or nil and an io error
local function count_file(path, models, max_line)
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  local f = { path = path, lines = 0, requests = 0, skipped = 0 }
  local ok, rerr = pcall(function()
    for n, text in rules.lines(fh, max_line) do
      f.lines = n
      local req = text and find(text, "%S") and safe_decode(text)
      local body = type(req) == "table" and req.body
      if type(body) ~= "table" then
        if not text or find(text, "%S") then f.skipped = f.skipped + 1 end   -- not a request
      else
        count_request(models, req, body)
        f.requests = f.requests + 1
      end
    end
  end)
  fh:close()
  if not ok then return nil, errors.io("cannot read", path, rerr) end
  return f
end

-- each model's tokens and costs, and the totals (costs nil when unknown)
local function price_models(models, prices, discount)
  local totals = { input_tokens = 0, output_tokens_max = 0, input_cost = prices and 0 or nil,
                   output_cost_max = prices and 0 or nil }
  local unpriced, all_known = {}, true
  for model, m in pairs(models) do
    m.input_tokens = m.cjk_chars + math.ceil(m.other_chars / 4)
    m.output_known = m.with_max_tokens == m.requests
    totals.input_tokens = totals.input_tokens + m.input_tokens
    totals.output_tokens_max = totals.output_tokens_max + m.output_tokens_max
    all_known = all_known and m.output_known
    local p = prices and prices[model]
    if prices and not p then unpriced[#unpriced + 1] = model end
    if p then
      m.price = { input = type(p.input) == "number" and p.input or nil,
                  output = type(p.output) == "number" and p.output or nil }
      if m.price.input then m.input_cost = cost.of(m.input_tokens, 0, m.price, discount) end
      if m.output_known and (m.price.output or m.output_tokens_max == 0) then
        m.output_cost_max = cost.of(0, m.output_tokens_max, m.price, discount)
      end
      totals.input_cost = m.input_cost and totals.input_cost and totals.input_cost + m.input_cost or nil
      totals.output_cost_max = m.output_cost_max and totals.output_cost_max
        and totals.output_cost_max + m.output_cost_max or nil
    end
  end
  if not all_known then totals.output_tokens_max = nil end
  if #unpriced > 0 then
    table.sort(unpriced)
    totals.unpriced, totals.input_cost, totals.output_cost_max = unpriced, nil, nil
  end
  return totals
end

--- Why an estimate's most cost is unknown, in words, or nil when it is
-- known (`totals.input_cost` and `totals.output_cost_max` both set): a
-- model without a price, requests that set no max_tokens, or lines whose
-- answers are not priced by tokens (`NOT_BY_TOKENS`: images, videos).
-- @tparam table rep what `files` returned
-- @treturn ?string the reason, naming the model and the endpoint
function M.unknown(rep)
  local t = rep.totals
  if t.input_cost and t.output_cost_max then return nil end
  if not rep.priced then return "no prices given" end
  if t.unpriced then return "no price for " .. table.concat(t.unpriced, ", ") end
  local names = {}
  for model in pairs(rep.models) do names[#names + 1] = model end
  table.sort(names)
  for _, model in ipairs(names) do
    local m = rep.models[model]
    for url in pairs(m.endpoints) do
      if m.not_by_tokens and M.NOT_BY_TOKENS[url] then
        return ("%s lines of %s: %s, which lbatch cannot bound"):format(url, model, M.NOT_BY_TOKENS[url])
      end
    end
    if not m.output_known then
      return ("%s: %d of %d requests set no max_tokens (or max_completion_tokens, max_output_tokens) "
        .. "to bound their answers"):format(model, m.requests - m.with_max_tokens, m.requests)
    end
    if not (m.price and m.price.input) then return ("no input price for %s"):format(model) end
    if m.output_tokens_max > 0 and not (m.price and m.price.output) then
      return ("no output price for %s"):format(model)
    end
  end
  return "an unknown cost"
end

--- Estimate request files before they are sent: requests per model and
-- endpoint, approximate input tokens, the most output tokens the requests
-- allow, and their cost at batch prices. Files are read line by line,
-- never whole.
--
-- Input tokens are approximate (`estimate.METHOD`): a CJK character
-- counts 1, four other characters count 1, rounded up per model; the
-- text is the messages' content (strings and text parts), `input` and
-- `prompt`. The output bound is the sum of `max_tokens`,
-- `max_completion_tokens` or `max_output_tokens` (0 for embeddings and
-- moderations); it is known for a model when every request sets one.
-- @tparam {string,...} paths request files (or one path)
-- @tparam[opt] table opts prices (a table `{[model] = {input = P, output
-- = P}}` in currency units per million tokens at real-time prices, or the
-- path of a JSON file of it), discount (batch price / real-time price,
-- default 0.5)
-- @treturn table the estimate `{files = {{path, lines, requests, skipped}},
-- lines, requests, skipped, discount, priced, method, models = {[model] =
-- {requests, endpoints = {[url] = n}, cjk_chars, other_chars, input_tokens,
-- output_tokens_max, output_known, with_max_tokens, price, input_cost,
-- output_cost_max}}, totals = {input_tokens, output_tokens_max,
-- input_cost, output_cost_max, unpriced}}`; costs are at batch prices and nil
-- when unknown. Or nil and an `io` error (a file) or an `invalid` one (the
-- prices).
function M.files(paths, opts)
  if type(paths) == "string" then paths = { paths } end
  errors.check("estimate.files", "paths", paths, "table")
  errors.check("estimate.files", "opts", opts, "table", true)
  opts = opts or {}
  local discount = opts.discount == nil and cost.DISCOUNT or opts.discount
  if type(discount) ~= "number" or discount ~= discount or discount < 0 then
    errors.arg("estimate.files", "opts.discount must be a number from 0")
  end
  local prices, perr = M.prices(opts.prices)
  if perr then return nil, perr end
  local max_line = 0
  for _, p in pairs(service.PROFILES) do max_line = math.max(max_line, p.max_line_bytes) end
  local rep = { files = {}, lines = 0, requests = 0, skipped = 0, models = {}, discount = discount,
                priced = prices ~= nil, method = M.METHOD }
  for i, path in ipairs(paths) do
    errors.check("estimate.files", "paths[" .. i .. "]", path, "string")
    local f, err = count_file(path, rep.models, max_line)
    if not f then return nil, err end
    rep.files[i] = f
    rep.lines, rep.requests, rep.skipped = rep.lines + f.lines, rep.requests + f.requests, rep.skipped + f.skipped
  end
  rep.totals = price_models(rep.models, prices, discount)
  return rep
end

return M
