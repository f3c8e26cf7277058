# The naive join in Python (bench/scale): every answer into a dict, then
# the inputs in order. python3 bench/join.py DIR
import json, sys
d = sys.argv[1]
by_id = {}
for p in (d + "/all.out.jsonl", d + "/all.err.jsonl"):
    with open(p, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            by_id[r["custom_id"]] = r
n = ok = failed = missing = 0
with open(d + "/all.in.jsonl", encoding="utf-8") as f:
    for line in f:
        req = json.loads(line)
        r = by_id.get(req["custom_id"])
        n += 1
        if r is None:
            missing += 1
        elif r["error"] is None and r["response"]["status_code"] == 200:
            ok += 1
        else:
            failed += 1
print("%d records (%d ok, %d failed, %d missing)" % (n, ok, failed, missing))
