"""The L-BFGS probe of the results page ("The floor and the probe") for one backbone, data set and
pooling:

    python tools/probe_table.py --model minilm --data banking77 --pooling mean

The frozen trunk maps every train, dev and test row to the pooled features its classifier's head
reads (`pelib.classifier.split_head`: the mean of the token states, [CLS] through the pooler, or
the last real token). Softmax regression on the standardised train features is fitted to
convergence (`pelib.probe.fit_probe`: L-BFGS, 500 iterations) once per L2 weight of the grid;
dev macro-F1 chooses the weight, and that probe alone is scored on test. Prints one row of the
page's table. Deterministic: no seed, no dropout (the trunk runs in eval mode).
"""
import argparse

import torch

import pelib
from pelib.batching import encode
from pelib.classifier import split_head
from pelib.hooks import trunk_features
from pelib.metrics import classification_metrics
from pelib.probe import fit_probe

GRID = (1e-4, 1e-3, 1e-2)
POOLING = {"mean": "mean of the token states", "cls": "[CLS] + pooler", "last": "last real token"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--data", choices=("banking77", "clinc150"), default="banking77")
    ap.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                    help="MiniLM's pooling; SmolLM2 always reads its last real token")
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    if args.model == "smollm2" and args.pooling != "mean":
        raise SystemExit("probe_table: SmolLM2's classifier reads its last real token; drop --pooling")
    splits = {s: pelib.load_nlu(args.data, s) for s in ("train", "dev", "test")}
    n_classes = len(splits["train"].label_names)
    kw = dict(pooling=args.pooling) if args.model == "minilm" else {}
    model, tok = pelib.load_backbone(args.model, num_labels=n_classes, **kw)
    features = split_head(model)[0]
    z = {s: trunk_features(features, model, encode(tok, d.texts, args.max_length), tok.pad_token_id,
                           64, bf16=False)
         for s, d in splits.items()}                                    # (N, H) per split
    y = torch.tensor(splits["train"].labels)
    scores = {}
    for l2 in GRID:
        weight, bias = fit_probe(z["train"], y, n_classes, l2=l2)
        pred = {s: (z[s] @ weight.T + bias).argmax(1).tolist() for s in ("dev", "test")}
        scores[l2] = {s: classification_metrics(splits[s].labels, pred[s])["f1"] for s in pred}
        print(f"l2 {l2:g}: dev macro-F1 {scores[l2]['dev']:.4f}", flush=True)
    best = max(GRID, key=lambda l2: scores[l2]["dev"])
    pooling = "last real token" if args.model == "smollm2" else POOLING[args.pooling]
    print(f"| {args.data}, {args.model}, {pooling} | {best:g} | {scores[best]['dev']:.4f} | "
          f"{scores[best]['test']:.4f} |")


if __name__ == "__main__":
    main()
