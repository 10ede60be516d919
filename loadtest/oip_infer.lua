-- wrk script: OIP v2 REST inference of one 16-float row (the no-op mlp of `make
-- bench-overhead`), for cross-checking the Rust load generator:
--   wrk -t1 -c8 -d5s --latency -s loadtest/oip_infer.lua http://127.0.0.1:8000/v2/models/mlp/infer
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local row = {}
for i = 0, 15 do row[#row + 1] = string.format("%.4f", i / 16) end
wrk.body = '{"inputs":[{"name":"input","shape":[1,16],"datatype":"FP32","data":[' .. table.concat(row, ",") .. ']}]}'
