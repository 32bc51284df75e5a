-- Model routing for the fleet gateway (Envoy HTTP Lua filter).
--
-- Reads the JSON body of an inference request, checks it, and sets the
-- x-fleet-model header that the route table matches on, then asks Envoy to
-- pick the route again. No Python touches the body; responses are never
-- only scanned in passing for the usage numbers (never buffered), so streams
-- flow as they come.
--
-- The renderer prepends a table of configuration:
--   FLEET.models           served name -> the model's canonical name
--   FLEET.model_order      served names in the spec's order, for /v1/models
--   FLEET.model_json       served name -> its /v1/models entry (JSON)
--   FLEET.workers          worker name -> the canonical name of the model it serves
--   FLEET.context          canonical name -> the model's context (the most tokens one choice can make)
--   FLEET.routes           canonical name -> the set of inference routes its backend serves
--   FLEET.route_list       canonical name -> those routes as text, for the refusal of another
--   FLEET.max_tokens       largest max_tokens / max_completion_tokens accepted
--   FLEET.max_n            largest n / best_of accepted
--   FLEET.gatekeeper       the cluster the gatekeeper is reached through
--   FLEET.auth_timeout_ms  how long to wait for its answer
--   FLEET.trusted          true on the listener behind Caddy (gateway.front: caddy), see trusted_identity
--   FLEET.revocation_delay_ms  how old a thread's last /auth/sync may be when it uses a kept answer
--   FLEET.rate_limited     the header Envoy's local rate limit marks its refusals with (see rate_limited)
-- Everything below is static.
--
-- Identity comes from the gatekeeper: the filter asks it (`GET /auth/check`
-- with the request's credential headers) and takes X-Fleet-User, -Groups,
-- -Models (the served names the caller may use, "*" for all), -Key-Id and -App
-- (the app the key names, for the usage log and the console) from its answer. Without an answer, nothing passes (fail closed). For an API key
-- the answer says how long it may be kept (X-Fleet-Cache-Ms: up to 15 minutes,
-- never past the key's expiry); revocation keeps its bound through the sync
-- (see `sync` below). Those answers are kept per worker thread, so a known
-- key costs no round trip; anything else (provider tokens, browser sessions,
-- refusals) is asked every time. A user's request rate (X-Fleet-Rpm) is held
-- by Envoy's local rate limit filter, after this one: one token bucket per
-- user for all worker threads. For a user with a daily
-- token quota (X-Fleet-Daily-Tokens) each request also spends its most from a
-- lease of the user's quota that the gatekeeper books (`POST /auth/reserve`)
-- before it is sent.
--
-- Metering: a stream always asks the backend for its usage; the response is
-- scanned in passing for it, and for what the stream shows of its tokens in
-- case it never comes (see text_bytes). The access log (the usage log) reads
-- the numbers from the dynamic metadata this filter keeps current.

local MAX_DEPTH = 64
-- The inference routes, each with the API whose error shape its refusals take.
local INFERENCE = {
  ["/v1/chat/completions"] = "openai",
  ["/v1/completions"] = "openai",
  ["/v1/embeddings"] = "openai",
  ["/v1/responses"] = "openai",
  ["/v1/rerank"] = "openai",
  ["/v1/messages"] = "anthropic",
  ["/v1/messages/count_tokens"] = "anthropic",
}
-- Routes that generate nothing: their most completion tokens is 0.
local NO_COMPLETION = { ["/v1/embeddings"] = true, ["/v1/rerank"] = true, ["/v1/messages/count_tokens"] = true }
-- Routes whose streams take stream_options.include_usage (the others always end with their usage).
local CHUNKED_USAGE = { ["/v1/chat/completions"] = true, ["/v1/completions"] = true }
-- Body fields that would make a backend or a client library call elsewhere.
local FORBIDDEN_FIELDS = { "api_base", "base_url", "api_key", "organization", "extra_headers" }

-- JSON: a strict recursive-descent reader. It validates the whole document
-- and returns the top-level object's scalar members (nested values are
-- checked, then replaced by the marker NESTED).
local NESTED = {}

local function fail(msg) error({ json = msg }, 0) end

local function skip_ws(s, i)
  return string.find(s, "[^ \t\r\n]", i) or (#s + 1)
end

local function utf8_char(code)
  if code < 0x80 then return string.char(code) end
  if code < 0x800 then
    return string.char(0xC0 + math.floor(code / 0x40), 0x80 + code % 0x40)
  end
  return string.char(0xE0 + math.floor(code / 0x1000), 0x80 + math.floor(code / 0x40) % 0x40, 0x80 + code % 0x40)
end

local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function read_string(s, i)
  -- s[i] is the opening quote
  local j = i + 1
  local out = nil
  while true do
    local k = string.find(s, '["\\%c]', j)
    if not k then fail("unterminated string") end
    local c = string.sub(s, k, k)
    if c == '"' then
      if out == nil then return string.sub(s, i + 1, k - 1), k + 1 end
      out[#out + 1] = string.sub(s, j, k - 1)
      return table.concat(out), k + 1
    elseif c == "\\" then
      out = out or {}
      out[#out + 1] = string.sub(s, j, k - 1)
      local e = string.sub(s, k + 1, k + 1)
      if e == "u" then
        local hex = string.sub(s, k + 2, k + 5)
        if not string.match(hex, "^%x%x%x%x$") then fail("bad \\u escape") end
        out[#out + 1] = utf8_char(tonumber(hex, 16))
        j = k + 6
      elseif ESCAPES[e] then
        out[#out + 1] = ESCAPES[e]
        j = k + 2
      else
        fail("bad escape")
      end
    else
      fail("control character in string")
    end
  end
end

local function read_number(s, i)
  local j = i
  if string.sub(s, j, j) == "-" then j = j + 1 end
  local int = string.match(s, "^%d+", j)
  if not int or (#int > 1 and string.sub(int, 1, 1) == "0") then fail("bad number") end
  j = j + #int
  local frac = string.match(s, "^%.%d+", j)
  if frac then j = j + #frac elseif string.sub(s, j, j) == "." then fail("bad number") end
  local exp = string.match(s, "^[eE][+-]?%d+", j)
  if exp then j = j + #exp elseif string.match(s, "^[eE]", j) then fail("bad number") end
  return tonumber(string.sub(s, i, j - 1)), j
end

local read_value

-- At the top level (``spans`` given) each member's name must be unique: readers differ on which of
-- two equal names wins (the last for most, the first for some), and a body that means one thing here
-- and another to the backend could dodge a check or the metering ("stream" twice, say). Each member's
-- text span is recorded, so the body can be rebuilt member by member.
local function read_container(s, i, depth, spans)
  if depth > MAX_DEPTH then fail("nested too deeply") end
  local open = string.sub(s, i, i)
  local close = open == "{" and "}" or "]"
  local members = spans and {} or nil
  local seen = spans and {} or nil
  i = skip_ws(s, i + 1)
  if string.sub(s, i, i) == close then return members or NESTED, i + 1 end
  while true do
    local key
    local from = i
    if open == "{" then
      if string.sub(s, i, i) ~= '"' then fail("expected a member name") end
      key, i = read_string(s, i)
      i = skip_ws(s, i)
      if string.sub(s, i, i) ~= ":" then fail("expected ':'") end
      i = skip_ws(s, i + 1)
    end
    local value, vfrom = nil, i
    value, i = read_value(s, i, depth + 1)
    if members and key ~= nil then
      if seen[key] then fail("the member '" .. key .. "' appears more than once") end
      seen[key] = true
      members[key] = value
      spans[#spans + 1] = { key = key, from = from, to = i - 1, value_from = vfrom }
    end
    i = skip_ws(s, i)
    local c = string.sub(s, i, i)
    if c == close then return members or NESTED, i + 1 end
    if c ~= "," then fail("expected ',' or '" .. close .. "'") end
    i = skip_ws(s, i + 1)
  end
end

read_value = function(s, i, depth)
  local c = string.sub(s, i, i)
  if c == '"' then
    return read_string(s, i)
  elseif c == "{" or c == "[" then
    local _, j = read_container(s, i, depth, false)
    return NESTED, j
  elseif c == "-" or string.match(c, "%d") then
    return read_number(s, i)
  elseif string.sub(s, i, i + 3) == "true" then
    return true, i + 4
  elseif string.sub(s, i, i + 4) == "false" then
    return false, i + 5
  elseif string.sub(s, i, i + 3) == "null" then
    return nil, i + 4
  end
  fail("unexpected character")
end

-- Returns the top-level object's members and their spans, or nil and a reason.
local function parse_object(s)
  local i = skip_ws(s, 1)
  if string.sub(s, i, i) ~= "{" then return nil, "the body must be a JSON object" end
  local spans = {}
  local ok, members, j = pcall(read_container, s, i, 1, spans)
  if not ok then
    local reason = type(members) == "table" and members.json or "invalid JSON"
    return nil, reason
  end
  if skip_ws(s, j) <= #s then return nil, "trailing data after the JSON object" end
  return members, spans
end

-- OpenAI-style error responses.
local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

-- An error body in the OpenAI shape.
local function error_json(message, err_type, code, param)
  return '{"error":{"message":' .. json_string(message) .. ',"type":' .. json_string(err_type)
    .. ',"param":' .. (param and json_string(param) or "null") .. ',"code":' .. json_string(code) .. "}}"
end

-- An error body in Anthropic's shape (its error types by status, as its API documents them).
local ANTHROPIC_TYPES = {
  [400] = "invalid_request_error", [401] = "authentication_error", [403] = "permission_error",
  [404] = "not_found_error", [413] = "request_too_large", [429] = "rate_limit_error", [503] = "overloaded_error",
  [504] = "timeout_error",
}

local function anthropic_json(status, message)
  return '{"type":"error","error":{"type":' .. json_string(ANTHROPIC_TYPES[status] or "api_error")
    .. ',"message":' .. json_string(message) .. "}}"
end

local api_path -- below

-- Whether this request's refusals take Anthropic's shape: it came on one of Anthropic's routes. (Read from
-- the path when a refusal is made, so the requests that pass pay nothing for it.)
local function anthropic(handle)
  local route = api_path(handle:headers():get(":path") or "")
  return route ~= nil and INFERENCE[route] == "anthropic"
end

local function reject(handle, status, message, err_type, code, param)
  local headers = { [":status"] = tostring(status), ["content-type"] = "application/json" }
  if status == 401 then headers["www-authenticate"] = 'Bearer realm="fleet"' end
  if anthropic(handle) then return handle:respond(headers, anthropic_json(status, message)) end
  handle:respond(headers, error_json(message, err_type, code, param))
end

local function check_count(handle, members, field, limit)
  local v = members[field]
  if v == nil then return true end
  if type(v) ~= "number" or v ~= math.floor(v) or v < 1 or v > limit then
    reject(handle, 400, string.format("'%s' must be an integer from 1 to %d", field, limit),
      "invalid_request_error", "invalid_value", field)
    return false
  end
  return true
end

-- The path's API route and, for /proxy/{worker}/v1/..., the worker.
api_path = function(path)
  local bare = string.match(path, "^[^?]*")
  if INFERENCE[bare] then return bare, nil end
  local worker, rest = string.match(bare, "^/proxy/([%w%-]+)(/v1/.*)$")
  if rest and INFERENCE[rest] then return rest, worker end
  return nil, nil
end

-- The models a request's identity may use, from the gatekeeper's X-Fleet-Models.
local function allowed_set(value)
  local set = {}
  for name in string.gmatch(value, "[^,]+") do set[name] = true end
  return set
end

local function may_use(allowed, name)
  return allowed["*"] or allowed[name]
end

-- Authentication: the gatekeeper's answers, reused while they say they may be.
local IDENTITY = { "x-fleet-user", "x-fleet-groups", "x-fleet-models", "x-fleet-key-id", "x-fleet-app", "x-fleet-rpm" }
local CREDENTIALS = { "authorization", "x-api-key", "cookie" }
local CACHE_MAX = 10000
local answers, answer_count = {}, 0 -- credential -> { expires (ms), identity = {...}, allowed, daily }

local function unavailable(handle)
  reject(handle, 503, "the gateway cannot reach its gatekeeper; retry shortly", "server_error", "service_unavailable")
end

-- The message of an OpenAI-shaped error body ({"error": {"message": ...}}), for the same refusal in another shape.
local function refusal_message(body)
  local members, spans = parse_object(body)
  if members ~= nil then
    for _, span in ipairs(spans) do
      if span.key == "error" then
        local inner = parse_object(string.sub(body, span.value_from, span.to))
        if inner ~= nil and type(inner.message) == "string" then return inner.message end
      end
    end
  end
  return "the gateway refused the request"
end

-- Relay the gatekeeper's refusal as it gave it (in Anthropic's shape on its routes); anything that is not its answer is a 503.
local function relay_refusal(handle, reply, body)
  local status = reply[":status"]
  local ctype = reply["content-type"] or ""
  if (status == "401" or status == "403" or status == "429" or status == "503")
      and string.sub(ctype, 1, 16) == "application/json" and body ~= nil then
    local out = { [":status"] = status, ["content-type"] = "application/json" }
    out["retry-after"] = reply["retry-after"]
    out["www-authenticate"] = reply["www-authenticate"]
    if anthropic(handle) then body = anthropic_json(tonumber(status), refusal_message(body)) end
    return handle:respond(out, body)
  end
  return unavailable(handle)
end

-- Behind Caddy (FLEET.trusted): the identity is the gatekeeper's answer, which Caddy asked for
-- (forward_auth) and copied onto the request after removing every client-sent x-fleet-* header; only
-- Caddy can reach this listener (a Unix socket of mode 0600). No identity: nothing passes.
local function trusted_identity(handle, headers)
  -- Caddy copies only what the answer had, and the answer had a user only when it was a yes; an empty
  -- model list (a user the spec gives nothing) does not survive the copy, and means none.
  local models, user = headers:get("x-fleet-models"), headers:get("x-fleet-user")
  if user == nil then return unavailable(handle) end
  local answer = { identity = {}, allowed = allowed_set(models or ""), daily = headers:get("x-fleet-daily-tokens") }
  for _, name in ipairs(IDENTITY) do answer.identity[name] = headers:get(name) end
  headers:remove("x-fleet-daily-tokens")
  return answer
end

-- Kept answers stay valid while this thread knows every revocation older than the revocation delay: it
-- asks the gatekeeper which keys were revoked since its last sync (`GET /auth/sync`), and drops their
-- answers; a kept answer is used only when the last sync began within the revocation delay. Syncing
-- starts at a quarter of the delay, by one request at a time, so a steady stream of requests never waits;
-- after a full delay without a sync (an idle thread, or a gatekeeper that does not answer), a request
-- waits for one, and without one it is a 503. A new gatekeeper epoch (it restarted, perhaps with another
-- spec) drops every answer.
local sync = { at = -1e18, since = nil, epoch = nil, running = false }

local function drop_answers(revoked)
  for slot, kept in pairs(answers) do
    if revoked == nil or revoked[kept.identity["x-fleet-key-id"] or ""] then
      answers[slot] = nil
      answer_count = answer_count - 1
    end
  end
end

-- One sync; true when it succeeded. Suspends the filter (header handles from before it are invalid).
local function synced(handle)
  local began = handle:timestamp()
  local ask = { [":method"] = "GET", [":path"] = "/auth/sync", [":authority"] = "gatekeeper",
    ["x-fleet-since"] = sync.since }
  sync.running = true
  local reply = handle:httpCall(FLEET.gatekeeper, ask, "", FLEET.auth_timeout_ms)
  sync.running = false
  if reply == nil or reply[":status"] ~= "200" or reply["x-fleet-since"] == nil then return false end
  if reply["x-fleet-epoch"] ~= sync.epoch then
    if sync.epoch ~= nil then drop_answers(nil) end
    sync.epoch = reply["x-fleet-epoch"]
  end
  local revoked = {}
  for id in string.gmatch(reply["x-fleet-revoked"] or "", "[^,]+") do revoked[id] = true end
  if next(revoked) ~= nil then drop_answers(revoked) end
  if began > sync.at then sync.at = began end
  sync.since = reply["x-fleet-since"]
  return true
end

-- The caller's identity, from a reused answer or a fresh one; nil when the request was answered.
local function authenticate(handle, headers)
  if FLEET.trusted then return trusted_identity(handle, headers) end
  if headers:getNumValues("authorization") > 1 or headers:getNumValues("x-api-key") > 1 then
    return reject(handle, 401, "You provided more than one API key; send exactly one.", "invalid_request_error",
      "missing_api_key")
  end
  local authorization, api_key = headers:get("authorization"), headers:get("x-api-key")
  local key = authorization or api_key
  local slot = key and ((authorization or "") .. "\n" .. (api_key or ""))
  local now = handle:timestamp()
  local hit = slot and answers[slot]
  if hit and hit.expires > now then
    local age = now - sync.at
    if age < FLEET.revocation_delay_ms / 4 or (sync.running and age < FLEET.revocation_delay_ms) then
      return hit
    end
    handle:body() -- as before asking /auth/check (below): the body must not pass on while we wait
    if not synced(handle) and handle:timestamp() - sync.at >= FLEET.revocation_delay_ms then
      return unavailable(handle)
    end
    hit = answers[slot]
    if hit then return hit end
    headers = handle:headers() -- revoked since: ask about it as about any other (the old handle is invalid)
  end
  if key == nil and headers:get("cookie") == nil then
    return reject(handle, 401,
      "You didn't provide an API key, or provided more than one. Send one as 'Authorization: Bearer sk-…'.",
      "invalid_request_error", "missing_api_key")
  end
  local ask = { [":method"] = "GET", [":path"] = "/auth/check", [":authority"] = "gatekeeper" }
  for _, name in ipairs(CREDENTIALS) do ask[name] = headers:get(name) end
  -- Read the whole body (if any) before asking: body bytes arriving while the filter waits for the
  -- gatekeeper would be passed on, and the request with them, before the answer. (This suspends the
  -- filter: `headers` is not valid after it.)
  handle:body()
  -- Unreachable, refusing connections or hanging past the timeout: Envoy answers 503/504 itself.
  local reply, body = handle:httpCall(FLEET.gatekeeper, ask, "", FLEET.auth_timeout_ms)
  if reply == nil then return unavailable(handle) end
  if reply[":status"] ~= "200" or reply["x-fleet-models"] == nil then return relay_refusal(handle, reply, body) end
  local answer = { identity = {}, allowed = allowed_set(reply["x-fleet-models"]), daily = reply["x-fleet-daily-tokens"] }
  for _, name in ipairs(IDENTITY) do answer.identity[name] = reply[name] end
  local reuse_ms = tonumber(reply["x-fleet-cache-ms"] or "")
  if slot and reuse_ms and reuse_ms > 0 then
    answer.expires = handle:timestamp() + reuse_ms
    if answers[slot] == nil then
      if answer_count >= CACHE_MAX then answers, answer_count = {}, 0 end
      answer_count = answer_count + 1
    end
    answers[slot] = answer
  end
  return answer
end

local function models_list(handle, allowed, path)
  local one = string.match(path, "^/v1/models/(.+)$")
  if one then
    if not FLEET.models[one] or not may_use(allowed, one) then
      return reject(handle, 404, string.format("The model '%s' does not exist", one),
        "invalid_request_error", "model_not_found", "model")
    end
    return handle:respond({ [":status"] = "200", ["content-type"] = "application/json" }, FLEET.model_json[one])
  end
  local items = {}
  for _, name in ipairs(FLEET.model_order) do
    if may_use(allowed, name) then items[#items + 1] = FLEET.model_json[name] end
  end
  handle:respond({ [":status"] = "200", ["content-type"] = "application/json" },
    '{"object":"list","data":[' .. table.concat(items, ",") .. "]}")
end

-- Metering. A stream's usage is asked of the backend whatever the client sent: the client's own
-- stream_options are kept only when they already ask for it (then the client also receives it);
-- otherwise they are replaced, and the extra usage event is taken out of the response.
local function asks_for_usage(raw, spans)
  for _, span in ipairs(spans) do
    if span.key == "stream_options" then
      local inner = parse_object(string.sub(raw, span.value_from, span.to))
      return inner ~= nil and inner.include_usage == true
    end
  end
  return false
end

local function with_usage(raw, spans)
  local parts = { '{"stream_options":{"include_usage":true}' }
  for _, span in ipairs(spans) do
    if span.key ~= "stream_options" then parts[#parts + 1] = string.sub(raw, span.from, span.to) end
  end
  return table.concat(parts, ",") .. "}"
end

-- The most completion tokens a request can make: each of its choices (n, or best_of for
-- /v1/completions) ends at the largest limit it names (llama.cpp reads n_predict before max_tokens,
-- so whichever the backend honours is covered; Responses calls it max_output_tokens), and never past the
-- model's context.
local function completion_cap(members, route, canonical)
  if NO_COMPLETION[route] then return 0 end
  local context = FLEET.context[canonical]
  local per = nil
  for _, field in ipairs({ "max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict" }) do
    local v = members[field]
    if type(v) == "number" and (per == nil or v > per) then per = v end
  end
  if per == nil or per > context then per = context end
  return math.max(members.n or 1, members.best_of or 1) * per
end

-- Quota leases, per Envoy worker thread: user -> { id, left, expires (ms), admitted, spent }. A request of a
-- user with a daily quota spends its bound from the user's lease; when the lease is spent or expired, the
-- gatekeeper is asked for a new one (`POST /auth/reserve`) and told what the old one admitted, so it holds
-- exactly what can still be running (controller/gateway/ledger.py, LEASES).
local leases, lease_count = {}, 0

local function tag(handle, lease_id, tokens)
  local meta = handle:streamInfo():dynamicMetadata()
  meta:set("fleet", "lease", lease_id)
  meta:set("fleet", "reserved", tostring(tokens))
end

-- Spend `tokens` of the user's daily quota on this request; false when the request was answered (quota used
-- up, gatekeeper down).
local function reserve(handle, answer, tokens)
  local user = answer.identity["x-fleet-user"]
  local now = handle:timestamp()
  local lease = leases[user]
  -- Never spent while it is being renewed: the report sent with the renewal must be final.
  if lease and not lease.asking and lease.expires > now and lease.left >= tokens then
    lease.left = lease.left - tokens
    lease.admitted = lease.admitted + 1
    lease.spent = lease.spent + tokens
    tag(handle, lease.id, tokens)
    return true
  end
  local ask = {
    [":method"] = "POST", [":path"] = "/auth/reserve", [":authority"] = "gatekeeper",
    ["x-fleet-user"] = user, ["x-fleet-daily-tokens"] = answer.daily, ["x-fleet-reserve"] = tostring(tokens),
  }
  -- One renewal at a time per user and thread: a request that finds one under way asks for itself alone
  -- (a lease of exactly its bound, closed at once), so concurrent requests never book a lease each.
  local single = lease ~= nil and lease.asking
  if single then
    ask["x-fleet-lease-single"] = "1"
  else
    if lease and lease.id then ask["x-fleet-lease-report"] = lease.id .. ":" .. lease.admitted .. ":" .. lease.spent end
    lease = lease or { left = 0, expires = 0, admitted = 0, spent = 0 }
    lease.asking = true
    if leases[user] == nil then
      if lease_count >= CACHE_MAX then leases, lease_count = {}, 0 end -- the gatekeeper drops forgotten ones
      lease_count = lease_count + 1
    end
    leases[user] = lease
  end
  local reply, body = handle:httpCall(FLEET.gatekeeper, ask, "", FLEET.auth_timeout_ms)
  if not single then lease.asking = false end
  if reply == nil then -- the report may not have arrived: it is sent again with the next ask
    unavailable(handle)
    return false
  end
  local granted = tonumber(reply["x-fleet-lease-tokens"] or "")
  if reply[":status"] ~= "200" or reply["x-fleet-lease"] == nil or granted == nil then
    if reply[":status"] == "429" and not single then -- the report was taken with the refusal: the lease is closed
      lease.id, lease.left, lease.expires = nil, 0, 0
    end
    relay_refusal(handle, reply, body)
    return false
  end
  if single then
    tag(handle, reply["x-fleet-lease"], tokens)
    return true
  end
  local ms = tonumber(reply["x-fleet-lease-ms"] or "") or 0
  lease.id, lease.left, lease.expires = reply["x-fleet-lease"], granted - tokens, handle:timestamp() + ms
  lease.admitted, lease.spent = 1, tokens
  tag(handle, lease.id, tokens)
  return true
end

function envoy_on_request(handle)
  local headers = handle:headers()
  -- A client's x-fleet-* and x-envoy-* headers are gone already (the header_mutation filter before this one).

  -- Browser sign-in pages and the operator console go to the gatekeeper itself, which decides there
  -- (routes "gatekeeper-pages" and "console").
  local path = headers:get(":path") or ""
  if string.sub(path, 1, 6) == "/auth/" then return end
  local page = string.match(path, "^[^?]*")
  if page == "/console" or string.sub(page, 1, 9) == "/console/" then return end

  local route, worker = api_path(path)

  -- Fail closed: without the gatekeeper's answer nobody gets anything.
  local answer = authenticate(handle, headers)
  if answer == nil then return end
  local allowed = answer.allowed
  -- Asking the gatekeeper suspended the filter: take the headers again.
  headers = handle:headers()
  for name, value in pairs(answer.identity) do headers:replace(name, value) end
  -- A user with a request rate: Envoy's local rate limit, next in the chain, takes a token from their
  -- bucket (x-fleet-user, x-fleet-rpm); a refusal comes back through envoy_on_response.
  local rpm = answer.identity["x-fleet-rpm"]
  if rpm then
    local meta = handle:streamInfo():dynamicMetadata()
    meta:set("fleet", "rpm", rpm)
    -- The refusal is made on the response, which no longer has the path: it is told the shape here.
    if route and INFERENCE[route] == "anthropic" then meta:set("fleet", "shape", "anthropic") end
  end
  local method = headers:get(":method")
  local bare = string.match(path, "^[^?]*")
  if method == "GET" and (bare == "/v1/models" or string.match(bare, "^/v1/models/")) then
    return models_list(handle, allowed, bare)
  end
  if method ~= "POST" or not route then return end

  local body = handle:body()
  if body == nil or body:length() == 0 then
    return reject(handle, 400, "the request body must be a JSON object", "invalid_request_error", "invalid_json")
  end
  local raw = body:getBytes(0, body:length())
  local members, spans = parse_object(raw) -- spans: the members' spans, or why the body is not JSON
  if members == nil then
    return reject(handle, 400, "could not parse the JSON body of your request: " .. spans,
      "invalid_request_error", "invalid_json")
  end
  local model = members.model
  if type(model) ~= "string" or model == "" then
    return reject(handle, 400, "you must provide a model parameter", "invalid_request_error", "missing_model", "model")
  end
  for _, field in ipairs(FORBIDDEN_FIELDS) do
    if members[field] ~= nil then
      return reject(handle, 400, string.format("the field '%s' is not allowed", field),
        "invalid_request_error", "forbidden_field", field)
    end
  end
  if members.stream ~= nil and type(members.stream) ~= "boolean" then
    return reject(handle, 400, "'stream' must be true or false", "invalid_request_error", "invalid_value", "stream")
  end
  if not (check_count(handle, members, "max_tokens", FLEET.max_tokens)
      and check_count(handle, members, "max_completion_tokens", FLEET.max_tokens)
      and check_count(handle, members, "max_output_tokens", FLEET.max_tokens)
      and check_count(handle, members, "n_predict", FLEET.max_tokens)
      and check_count(handle, members, "n", FLEET.max_n)
      and check_count(handle, members, "best_of", FLEET.max_n)) then
    return
  end
  local canonical = FLEET.models[model]
  if not canonical or not may_use(allowed, model) and not may_use(allowed, canonical) then
    -- A model the caller may not use is reported as missing when they cannot list it either.
    if canonical and (may_use(allowed, canonical) or next(allowed) ~= nil) then
      return reject(handle, 403, string.format("you are not allowed to use the model '%s'", model),
        "invalid_request_error", "model_not_allowed", "model")
    end
    return reject(handle, 404, string.format("The model '%s' does not exist", model),
      "invalid_request_error", "model_not_found", "model")
  end
  if worker ~= nil and FLEET.workers[worker] ~= canonical then
    return reject(handle, 400, string.format("worker '%s' does not serve the model '%s'", worker, model),
      "invalid_request_error", "wrong_worker", "model")
  end
  if not FLEET.routes[canonical][route] then
    return reject(handle, 400, string.format("the model '%s' does not serve %s; its backend serves %s", model, route,
      FLEET.route_list[canonical]), "invalid_request_error", "unsupported_route", "model")
  end

  local meta = handle:streamInfo():dynamicMetadata()
  meta:set("fleet", "model", canonical)
  -- The most tokens this request can cost (metering's upper bounds, see completion_cap).
  local cap = completion_cap(members, route, canonical)
  meta:set("fleet", "completion_cap", tostring(cap))
  if members.stream == true then
    meta:set("fleet", "stream", "1")
    -- Usage is always asked of the backend; what the client asked decides only what it receives. (Responses
    -- and Messages streams always end with it.)
    if CHUNKED_USAGE[route] and not asks_for_usage(raw, spans) then
      handle:body():setBytes(with_usage(raw, spans))
      meta:set("fleet", "strip_usage", "1")
    end
  end
  -- A user with a daily token quota books this request's most before it is sent, so requests in
  -- flight together can never take the user past the quota.
  if answer.daily ~= nil and not reserve(handle, answer, #raw + cap) then return end
  if route == "/v1/messages/count_tokens" then -- counting generates nothing: the request is metered at 0
    meta = handle:streamInfo():dynamicMetadata()
    meta:set("fleet", "prompt_tokens", "0")
    meta:set("fleet", "completion_tokens", "0")
  end
  -- body() suspended the filter; header handles from before it are no longer valid.
  local after = handle:headers()
  after:replace("x-fleet-model", model)
  handle:clearRouteCache()
end

-- Usage from the response as it passes, without buffering it: look for the
-- backend's "usage" object in each chunk (with the tail of the previous one,
-- in case it straddles two), and record the numbers for the access log.
local TAIL = 512

-- The end of the JSON object that opens at `from` (its closing brace), or nil when the text ends first.
local function object_end(text, from)
  local depth, i = 0, from
  while true do
    local k = string.find(text, "[{}]", i)
    if not k then return nil end
    depth = depth + (string.sub(text, k, k) == "{" and 1 or -1)
    if depth == 0 then return k end
    i = k + 1
  end
end

-- Whether the usage object at `at` is that of an Anthropic stream's message_start event, which counts the
-- prompt but not yet the answer (its output_tokens is what was made so far; message_delta's is final).
local function in_message_start(text, at)
  local event, from = 1, 1
  while true do
    local found = string.find(text, "data: {", from, true)
    if not found or found > at then break end
    event, from = found, found + 1
  end
  return string.find(string.sub(text, event, at), '"message_start"', 1, true) ~= nil
end

local function number_in(usage, field)
  return tonumber(string.match(usage, '"' .. field .. '"%s*:%s*(%d+)') or "")
end

-- The usage numbers in `text`, each of the latest object that has it: prompt tokens (OpenAI's prompt_tokens,
-- or Responses' and Messages' input_tokens with Messages' cached ones), completion tokens (completion_tokens,
-- output_tokens), and whether the latest object is cut off at the text's end.
local function scan_usage(text)
  local prompt, completion, cut = nil, nil, false
  local from = 1
  while true do
    local at, brace = string.find(text, '"usage"%s*:%s*{', from)
    if not at then break end
    local close = object_end(text, brace)
    cut = close == nil
    local usage = string.sub(text, brace, close or #text)
    local p = number_in(usage, "prompt_tokens")
    if p == nil then
      p = number_in(usage, "input_tokens")
      if p ~= nil then
        p = p + (number_in(usage, "cache_read_input_tokens") or 0) + (number_in(usage, "cache_creation_input_tokens") or 0)
      end
    end
    if not cut then
      prompt = p or prompt
      if not in_message_start(text, at) then
        completion = number_in(usage, "completion_tokens") or number_in(usage, "output_tokens") or completion
      end
    end
    from = brace + 1
  end
  return prompt, completion, cut
end

-- The usage-only event we asked for on the client's behalf, when it sits whole in one chunk.
local function drop_injected_usage(text)
  return (string.gsub(text, 'data: {[^\n]-"choices"%s*:%s*%[%s*%][^\n]-"usage"%s*:[^\n]*\n\n', ""))
end

-- What a stream's chunk shows of the tokens it carries, for a stream that ends without the backend's
-- own numbers (client gone, backend killed, no usage sent): counted as the stream passes, so such a
-- stream is still metered, marked estimated. Each generated token is at least one byte of the text it
-- adds (several tokens can arrive in one event: llama.cpp holds back the bytes of an unfinished
-- character), so the bytes of the generated text (as escaped in the JSON, never fewer) bound the tokens
-- from above; the events ("data: {" at the start of a line) bound them when the text is empty.
local TEXT_FIELDS = {
  '"content":"', '"text":"', '"reasoning_content":"', '"arguments":"', -- chat and completions
  '"delta":"', -- Responses' text and argument deltas
  '"partial_json":"', '"thinking":"', -- Messages' tool input and thinking deltas (its text deltas: "text")
}

local function events_in(text)
  local count = string.sub(text, 1, 7) == "data: {" and 1 or 0
  local at = string.find(text, "\ndata: {", 1, true)
  while at do
    count = count + 1
    at = string.find(text, "\ndata: {", at + 8, true)
  end
  return count
end

-- The length of the string value that starts at `from` (just after its opening quote); to the chunk's
-- end when it is cut there.
local function string_length(text, from)
  local j = from
  while true do
    local q = string.find(text, '"', j, true)
    if not q then return #text - from + 1 end
    local k = q - 1
    while k >= from and string.byte(text, k) == 92 do k = k - 1 end -- backslashes before the quote
    if (q - 1 - k) % 2 == 0 then return q - from end
    j = q + 1
  end
end

local function text_bytes(text)
  local total = 0
  for _, key in ipairs(TEXT_FIELDS) do
    local at = string.find(text, key, 1, true)
    while at do
      total = total + string_length(text, at + #key)
      at = string.find(text, key, at + #key, true)
    end
  end
  return total
end

-- The local rate limit's refusal, in the OpenAI error shape (Anthropic's on its routes): back when the bucket
-- holds a token again, at most 60/rpm seconds (it refills continuously).
local function rate_limited(handle, headers, meta)
  local rpm = meta.rpm
  headers:remove(FLEET.rate_limited)
  headers:replace("content-type", "application/json")
  headers:replace("retry-after", tostring(math.ceil(60 / tonumber(rpm))))
  local message = string.format("rate limit of %s requests per minute reached", rpm)
  handle:body():setBytes(meta.shape == "anthropic" and anthropic_json(429, message)
    or error_json(message, "invalid_request_error", "rate_limit_exceeded"))
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get("fleet")
  if meta ~= nil and meta.rpm ~= nil then
    local headers = handle:headers()
    if headers:get(FLEET.rate_limited) then return rate_limited(handle, headers, meta) end
  end
  -- Whole JSON responses are read natively (json_to_metadata, next in the chain): streams only here.
  if meta == nil or meta.stream ~= "1" then return end
  local strip = meta.strip_usage == "1"
  local events, bytes, seen = 0, 0, 0
  -- Most chunks of a stream hold no usage: a plain search decides, and only a chunk with
  -- '"usage"' in it (or across its border with the previous one, or right after one whose
  -- numbers were cut off) is scanned with the previous chunk's tail in front.
  local prev, pending = "", false
  for chunk in handle:bodyChunks() do
    local text = chunk:getBytes(0, chunk:length())
    events = events + events_in(text)
    bytes = bytes + text_bytes(text)
    local bound = bytes > events and bytes or events
    if bound > seen then
      seen = bound
      -- Kept current chunk by chunk: if the stream is cut, the access log reads what was counted so far;
      -- the events so far are the console's tokens of a request in flight (the live log, once a second).
      local counted = handle:streamInfo():dynamicMetadata()
      counted:set("fleet", "seen_tokens", tostring(seen))
      counted:set("fleet", "events", tostring(events))
    end
    if pending or string.find(text, '"usage"', 1, true)
        or string.find(string.sub(prev, -8) .. string.sub(text, 1, 8), '"usage"', 1, true) then
      local p, c, cut = scan_usage(string.sub(prev, -TAIL) .. text)
      pending = cut
      -- The prompt's count alone (an Anthropic stream's message_start) leaves the completion to be seen: a
      -- stream cut before its message_delta is metered from what passed (controller/gateway/ledger.py).
      if p or c then
        local out = handle:streamInfo():dynamicMetadata()
        if p then out:set("fleet", "prompt_tokens", tostring(p)) end
        if c then out:set("fleet", "completion_tokens", tostring(c)) end
      end
      if strip and p and string.find(text, '"usage"', 1, true) then
        local kept = drop_injected_usage(text)
        if #kept ~= #text then chunk:setBytes(kept) end
      end
    end
    prev = text
  end
end
