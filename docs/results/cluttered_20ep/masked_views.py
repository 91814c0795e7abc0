"""What LoDisc's masked views tell apart, for docs/RESULTS.md's "Seed 1's lock-in" section: for each finished
pretraining run on the cluttered sample, kNN k20 (cosine, temperature 0.07) of 1,000 val queries against
2,000 train images, each image reduced to (a) the binary mask of the patches its backbone keeps, (b) the
backbone's CLS of the zero_fill masked view (dropped patches at the dataset mean colour), (c) the same with the
dropped patches black (the canvas colour). Chance is 10 %.

    python docs/results/cluttered_20ep/masked_views.py runs/study_cluttered_20ep/seed{0,1,2}/lodisc
"""

import csv
import sys

import torch
from PIL import Image

import sslfg
from sslfg.methods.local import keep_indices, zero_fill
from sslfg.models.backbone import cls_attention, forward_tokens

ROOT = "data/cluttered"


def sample(split: str, n: int) -> list[dict]:
    rows = list(csv.DictReader(open(f"{ROOT}/{split}.csv")))
    return [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:n].tolist()]


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor) -> float:
    bank, queries = (torch.nn.functional.normalize(t.float(), dim=1) for t in (bank, queries))
    sims, idx = (queries @ bank.T).topk(20, dim=1)
    votes = torch.zeros(len(queries), 10).scatter_add_(1, bank_labels[idx], (sims / 0.07).exp())
    return 100 * (votes.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def reduce(run: str, rows: list[dict]) -> dict[str, torch.Tensor]:
    vit = sslfg.load_backbone(run).eval()
    transform = sslfg.load_transform(run, "features.crop_ratio=1.0")  # the whole canvas
    cfg = sslfg.load_recipe(f"{run}/config.yaml")
    data = cfg.data
    black = -torch.tensor(data.mean).view(1, -1, 1, 1) / torch.tensor(data.std).view(1, -1, 1, 1)
    patch = vit.patch_embed.patch_size[0]
    images = torch.stack([transform(Image.open(f"{ROOT}/images/{r['dir']}").convert("RGB")) for r in rows])
    out: dict[str, list[torch.Tensor]] = {"keep mask": [], "zero_fill view": [], "black-filled view": []}
    for x in images.split(250):
        with cls_attention(vit) as maps:
            forward_tokens(vit, x)
        keep = keep_indices(torch.stack(maps), cfg.method.local.keep_ratio)
        kept = zero_fill(torch.ones_like(x), keep, patch)  # 1 on kept patches, 0 on dropped ones
        out["keep mask"].append(kept[:, 0, ::patch, ::patch].flatten(1))
        out["zero_fill view"].append(forward_tokens(vit, zero_fill(x, keep, patch))[:, 0])
        out["black-filled view"].append(forward_tokens(vit, zero_fill(x, keep, patch) + (1 - kept) * black)[:, 0])
    return {k: torch.cat(v) for k, v in out.items()}


if __name__ == "__main__":
    train, val = sample("train", 2000), sample("val", 1000)
    train_y, val_y = (torch.tensor([int(r["class_id"]) for r in rows]) for rows in (train, val))
    for run in sys.argv[1:]:
        bank, queries = reduce(run, train), reduce(run, val)
        print(run, {k: round(knn_top1(bank[k], train_y, queries[k], val_y), 1) for k in bank})
