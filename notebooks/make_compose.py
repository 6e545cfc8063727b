"""Writes notebooks/compose.ipynb (run from notebooks/, then execute it with jupyter or nbclient)."""

import nbformat as nbf

cells = []


def md(text: str) -> None:
    cells.append(nbf.v4.new_markdown_cell(text))


def code(text: str) -> None:
    cells.append(nbf.v4.new_code_cell(text))


md("""# Composing adapters: Stack, Fuse, Parallel

fxadapt composes adapters with AdapterHub's blocks, expanded into graph nodes at every site
(`docs/composition.md`). This notebook, on a tiny BERT built from a config (nothing is downloaded):

The task is the one of `fxadapt demo`: does a right-padded sequence contain a marker token?

1. a MAD-X style `Stack("lang", "task")`, training the task adapter on top of a language adapter;
2. AdapterFusion: `Fuse("a", "b", "c")` trained for a few steps, the fusion layers only;
3. `Parallel("a", "b")`: one forward pass, one block of rows per adapter;
4. the composed graph, drawn.""")
code("""import os
import warnings

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging

import fxadapt
from fxadapt import Fuse, Parallel, Stack
from fxadapt.cli import demo

warnings.filterwarnings("ignore", message="IProgress not found")
logging.set_verbosity_error()
SMALL = os.environ.get("FXADAPT_NOTEBOOK_SMALL") == "1"  # the test suite runs a short version
STEPS = 10 if SMALL else 300
setting = demo.FULL  # the demo's task: does the sequence contain the marker token? (right-padded)
hf_model = demo.build_model(setting)
g = torch.Generator().manual_seed(0)
train, test = demo.make_data(4096, setting, g), demo.make_data(512, setting, g)


def batches(step, size=64):
    i = (step * size) % len(train["labels"])
    return {k: v[i : i + size] for k, v in train.items()}""")
md("""## 1. MAD-X: a task adapter stacked on a language adapter

`Stack("lang", "task")`: at every residual step the task adapter reads the language adapter's output.
Only the task adapter (and the classifier) train; the language adapter stays as it is.""")
code("""model = fxadapt.AdaptedModel(hf_model)
model.add_adapter("lang", "seq_bn")
model.add_adapter("task", "seq_bn")
model.train_adapter(Stack("lang", "task"))           # runs: lang, then task; trains both and the classifier
for p in model.adapters["lang"].parameters():        # MAD-X: the language adapter stays frozen
    p.requires_grad_(False)
print(model.adapter_summary())
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
stack_losses = []
for step in range(STEPS):
    loss = model(**batches(step)).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    stack_losses.append(loss.item())
print(f"loss {stack_losses[0]:.3f} -> {stack_losses[-1]:.3f}")""")
md("""## 2. AdapterFusion

Three adapters, a fusion layer at every place where all three live, and only the fusion layers
train (`train_adapter_fusion`). AdapterHub's regularisation keeps the value matrices near the identity.""")
code("""for name in ("a", "b", "c"):
    model.add_adapter(name, "seq_bn")
model.add_adapter_fusion(Fuse("a", "b", "c"))
model.train_adapter_fusion(Fuse("a", "b", "c"))  # the classifier stays as section 1 trained it
trainable = sorted({".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad})
print("trainable:", trainable)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
fuse_losses = []
for step in range(STEPS):
    loss = model(**batches(step)).loss + model.fusion_regularization_loss()
    loss.backward()
    opt.step()
    opt.zero_grad()
    fuse_losses.append(loss.item())
plt.figure(figsize=(5, 3))
plt.plot(stack_losses, label='Stack("lang", "task")')
plt.plot(fuse_losses, label='Fuse("a", "b", "c")')
plt.xlabel("step")
plt.ylabel("training loss")
plt.legend()
plt.tight_layout()
plt.show()""")
md("""## 3. Parallel inference

`Parallel(Stack("lang", "task"), "a")` replicates the batch at the graph's entry: `B` rows in, `2·B`
rows out, rows `[0, B)` through the trained stack, `[B, 2B)` through the (untrained) adapter `a`.
Each block equals its setup run alone.""")
code("""model.eval()
inputs = {k: v for k, v in test.items() if k != "labels"}
with torch.no_grad():
    model.set_active_adapters(Parallel(Stack("lang", "task"), "a"))
    both = model(**inputs).logits
    model.set_active_adapters(Stack("lang", "task"))
    task_alone = model(**inputs).logits
    model.set_active_adapters("a")
    a_alone = model(**inputs).logits
B = inputs["input_ids"].shape[0]
print("Parallel output rows:", both.shape[0], "for a batch of", B)
print("channel 0 == Stack(lang, task) alone:", torch.allclose(both[:B], task_alone, atol=1e-5))
print("channel 1 == a alone:", torch.allclose(both[B:], a_alone, atol=1e-5))
for name, logits in (("Stack(lang, task)", both[:B]), ("a", both[B:])):
    acc = (logits.argmax(-1) == test["labels"]).float().mean().item()
    print(f"accuracy through {name}: {acc:.2f}")""")
md("""## 4. The composed graph

Each block is a handful of nodes at every site: below, the fusion layer of layer 0 (the adapters'
`pre`, `up` and the `Fusion` module), then the same layer drawn before and after (made by
`docs/render_layers.py --compose`).""")
code("""model.set_active_adapters(Fuse("a", "b", "c"))
gm = model.graph_module
inserted = [n for n in gm.graph.nodes if n.meta.get("fxadapt") and "layer__0" in str(n.meta["fxadapt"].get("adapter", ""))]
for node in inserted[:12]:
    print(node.format_node())""")
code("""from pathlib import Path

from IPython.display import Image

Image(filename=str(Path("..") / "docs" / "img" / "compose_fuse.png"))""")
nb = nbf.v4.new_notebook()
nb["cells"] = cells
nb["metadata"] = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}
nbf.write(nb, "compose.ipynb")
