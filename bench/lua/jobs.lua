-- GET /v1/jobs/{id}, cycling through the job ids listed one per line in $BENCH_IDS.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do
  if line ~= "" then ids[#ids + 1] = line end
end
local prefix = os.getenv("BENCH_PATH_PREFIX") or "/v1/jobs/"
local i = 0

function setup(thread)
  -- each wrk thread starts at a different place in the list
  thread:set("offset", math.random(#ids))
end

request = function()
  i = i + 1
  local n = ((offset or 0) + i) % #ids + 1
  return wrk.format("GET", prefix .. ids[n])
end
