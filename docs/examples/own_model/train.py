"""Train the example's own model (net.py) on an image folder, outside this project's pipeline, as a
user would, and write what torch-model-archiver needs: net.pt (a state dict) and index_to_name.json.

    python docs/examples/own_model/train.py data/digits28 OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from net import Net  # noqa: E402

from export.data.loader import load_image_folder  # noqa: E402
from handlers.runtime.imaging import InputSpec, normalize  # noqa: E402

root, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
spec = InputSpec(28, 28, 1, (0.25,), (0.35,))
train = load_image_folder(root, spec, "train", progress=False)
test = load_image_folder(root, spec, "test", progress=False)
torch.manual_seed(0)
model = Net(len(train.classes))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
x, y = torch.from_numpy(normalize(train.pixels, spec)), torch.from_numpy(train.labels).long()
for _ in range(15):
    model.train()
    perm = torch.randperm(len(y))
    for i in range(0, len(y), 64):
        idx = perm[i:i + 64]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    accuracy = (model(torch.from_numpy(normalize(test.pixels, spec))).argmax(1).numpy() == test.labels).mean()
print(f"held-out accuracy {accuracy:.4f}")
torch.save(model.state_dict(), out / "net.pt")
(out / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(train.classes)}))
