-- wrk script of the benchmark. BENCH_POST_BYTES=N turns requests into an N-byte form POST.
-- done() prints one machine-readable line that bench.py parses.
local n = tonumber(os.getenv("BENCH_POST_BYTES") or "")
if n and n > 0 then
  local prefix = "data="
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.body = prefix .. string.rep("x", n - #prefix)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
