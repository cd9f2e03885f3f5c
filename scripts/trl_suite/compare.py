import sys, xml.etree.ElementTree as ET
def load(p):
    out = {}
    for tc in ET.parse(p).getroot().iter("testcase"):
        tid = tc.get("classname") + "::" + tc.get("name")
        st, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            e = tc.find(tag)
            if e is not None:
                st = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (e.get("message") or "")
                txt = (e.text or "")
                # first lines of the E-lines of the traceback
                elines = [l for l in txt.splitlines() if l.startswith("E ")][:4]
                msg = msg.splitlines()[0][:300] if msg else ""
                msg += ("\n      " + "\n      ".join(l[:200] for l in elines)) if elines else ""
                break
        out[tid] = (st, msg)
    return out
import os
WORK = sys.argv[1] if len(sys.argv) > 1 else "."
R = {k: load(f"{WORK}/junit_{k}.xml") for k in "ABC" if os.path.exists(f"{WORK}/junit_{k}.xml")}
for k in R:
    c = {}
    for st, _ in R[k].values(): c[st] = c.get(st, 0) + 1
    print(k, dict(sorted(c.items())))
for other in [k for k in "BC" if k in R]:
    print(f"\n== differs A vs {other} ==")
    for tid in sorted(set(R["A"]) | set(R[other])):
        a = R["A"].get(tid, ("absent", "")); b = R[other].get(tid, ("absent", ""))
        if a[0] != b[0]:
            print(f"{tid}: A={a[0]} {other}={b[0]}\n    {other}: {b[1]}")
print("\n== failures/errors common to all runs (A message) ==")
for tid, (st, m) in sorted(R["A"].items()):
    if st in ("failed", "error"):
        rest = " ".join(f"{k}={R[k].get(tid, ('absent',))[0]}" for k in "BC" if k in R)
        print(f"{tid}: A={st} {rest}  | {m.splitlines()[0][:160] if m else ''}")
