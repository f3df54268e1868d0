-- GET the URL given on wrk's command line, with the bearer token.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
