-- wrk script for bench/gateway.py: POST a small chat completion (keep-alive), count non-2xx answers,
-- and print one machine-readable line: BENCH_JSON {...}.
-- Environment: BENCH_KEY (a bearer token; none for the direct path), BENCH_MODEL (default "bench"),
-- BENCH_KEYS_FILE (one key per line: each request carries the next, cycled; overrides BENCH_KEY).
-- BENCH_BODY (a whole JSON body instead of the chat one; the route is wrk's URL), BENCH_KEY_HEADER
-- ("x-api-key": the key as Anthropic's clients send it, instead of Authorization: Bearer).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or ('{"model":"' .. (os.getenv("BENCH_MODEL") or "bench")
  .. '","messages":[{"role":"user","content":"hi"}],"max_tokens":16}')
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  if os.getenv("BENCH_KEY_HEADER") == "x-api-key" then
    wrk.headers["x-api-key"] = key
    wrk.headers["anthropic-version"] = "2023-06-01"
  else
    wrk.headers["Authorization"] = "Bearer " .. key
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local keyed = {} -- one whole request per key, built once per thread
local turn = 0

function init(args)
  non2xx = 0
  local path = os.getenv("BENCH_KEYS_FILE")
  if path and path ~= "" then
    for line in io.lines(path) do
      if line ~= "" then
        local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. line }
        keyed[#keyed + 1] = wrk.format("POST", nil, headers, wrk.body)
      end
    end
  end
end

if os.getenv("BENCH_KEYS_FILE") and os.getenv("BENCH_KEYS_FILE") ~= "" then
  function request()
    turn = turn % #keyed + 1
    return keyed[turn]
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
