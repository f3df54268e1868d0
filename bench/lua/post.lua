-- POST the JSON body in $BENCH_BODY to the URL given on wrk's command line (POST /v1/publish).
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
