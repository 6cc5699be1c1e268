-- wrk script for benches/load/run.sh: requests with an X-Device-Id header
-- drawn from DEVICE_IDS distinct IDs (dev-1 .. dev-N, default 10,000).
--
-- Environment: DEVICE_IDS (default 10000), LOAD_PATH (default "/"),
-- BODY_BYTES (default 0: GET; > 0: POST with a body of that many bytes),
-- CONN_CLOSE=1 (send "Connection: close": a new connection per request).
--
-- Each wrk thread cycles through all N IDs in order, starting at its own
-- offset, so every ID is used and the threads are not in lock-step. The
-- requests are pre-formatted once in init(): per request the script only
-- bumps an index, so the load generator spends its CPU on sockets, not Lua.
--
-- done() prints one machine-readable line (SP_RESULT ...) that run.sh parses;
-- latencies are in microseconds, as wrk keeps them.

local N = tonumber(os.getenv("DEVICE_IDS") or "10000")
local PATH = os.getenv("LOAD_PATH") or "/"
local BODY_BYTES = tonumber(os.getenv("BODY_BYTES") or "0")
local CONN_CLOSE = os.getenv("CONN_CLOSE") == "1"

local next_thread_id = 0

function setup(thread)
   thread:set("thread_id", next_thread_id)
   next_thread_id = next_thread_id + 1
end

function init(args)
   local method, body = "GET", nil
   if BODY_BYTES > 0 then
      method, body = "POST", string.rep("x", BODY_BYTES)
   end
   requests = {}
   for i = 1, N do
      local headers = { ["X-Device-Id"] = "dev-" .. i }
      if body then headers["Content-Type"] = "application/octet-stream" end
      if CONN_CLOSE then headers["Connection"] = "close" end
      requests[i] = wrk.format(method, PATH, headers, body)
   end
   -- 4999 is coprime with 10,000: thread k starts k * 4999 IDs in.
   idx = ((thread_id or 0) * 4999) % N
end

function request()
   idx = idx % N + 1
   return requests[idx]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "SP_RESULT requests=%d duration_us=%d bytes=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f "
         .. "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d\n",
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status))
end
