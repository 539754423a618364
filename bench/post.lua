-- wrk script: POST one fixed body (file and content type given after `--`), report JSON on the last line; a third
-- argument names a file of more headers, one "Name: value" a line (a SigV4 signature of that very request).
-- Latency percentiles are wrk's own (its HdrHistogram of every request), in microseconds.
function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  wrk.headers["Content-Type"] = args[2]
  file:close()
  if args[3] then
    for line in io.lines(args[3]) do
      local name, value = line:match("^([^:]+): (.*)$")
      if name then wrk.headers[name] = value end
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
