"""Draw book/figures/next_token.png, the landing page's picture: what the loss measures.

SmolLM2-135M-Instruct reads "The capital of France is" and gives a probability to every one of
its 49152 tokens; the bars are the most likely ten. The loss at this position is
-log p of the token that really comes next. Run from the repository root with the
project's environment: `.venv/bin/python book/figures/next_token.py` (about 20 s on a CPU).
"""

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from reference.pretrained import load_smollm2

PROMPT, TARGET = "The capital of France is", " Paris"
OUT = Path(__file__).with_suffix(".png")

model, tok = load_smollm2()
ids = tok(PROMPT, return_tensors="pt")["input_ids"]
with torch.no_grad():
    probs = model(input_ids=ids).logits[0, -1].softmax(dim=-1)
target = tok(TARGET)["input_ids"][0]
top = probs.topk(10).indices.tolist()
if target not in top:
    top[-1] = target
labels = [repr(tok.decode([i]))[1:-1] for i in top]
p_target = probs[target].item()

fig, ax = plt.subplots(figsize=(8, 3.4), dpi=150)
colors = ["C3" if i == target else "0.7" for i in top]
ax.bar(range(len(top)), [probs[i].item() for i in top], color=colors)
ax.set_xticks(range(len(top)), [f'"{s}"' for s in labels], rotation=30, ha="right", fontsize=9)
ax.set_ylabel("probability")
ax.set_title(f'"{PROMPT} ..." : which token comes next?', fontsize=11)
k = top.index(target)
ax.annotate(
    f'the real next token "{TARGET.strip()}": p = {p_target:.3f}\nloss here = -log p = {-math.log(p_target):.2f}',
    xy=(k, p_target), xytext=(k + 1.5, p_target * 0.75),
    arrowprops=dict(arrowstyle="->", color="C3"), color="C3", fontsize=10,
)
ax.spines[["top", "right"]].set_visible(False)
fig.tight_layout()
fig.savefig(OUT)
print(f"wrote {OUT}: p({TARGET!r}) = {p_target:.3f}, -log p = {-math.log(p_target):.3f}")
