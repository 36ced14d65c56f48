"""Time building the BM25 text index (serving/text_search.py) for 10k and 100k products."""
import random, time, sys, json
sys.path.insert(0, ".")
from serving.text_search import TextIndex
words = open("/work/shared/datasets/grocery-store/dataset/iconic-images-and-descriptions/Vegetables/Asparagus/Asparagus_Description.txt").read().split()
rng = random.Random(0)
out = {}
for n in (10_000, 100_000):
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]
    t = time.perf_counter(); ti = TextIndex([f"P{i}" for i in range(n)], docs); b = time.perf_counter() - t
    t = time.perf_counter()
    for q in ("asparagus cooked", "fresh water", "refrigerator"):
        ti.scores(q)
    s = (time.perf_counter() - t) / 3
    out[n] = {"build_s": round(b, 3), "score_all_ms": round(s * 1e3, 2)}
print(json.dumps(out))
