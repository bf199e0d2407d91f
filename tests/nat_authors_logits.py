"""The authors' NAT/DiNAT (SHI-Labs classification/nat.py, dinat.py) against the zoo.

Needs the authors' ``classification/`` folder and a NATTEN with relative positional bias (0.14.x)
on PYTHONPATH, NATTEN first (the zoo's own tests use NATTEN 0.21 in their process). Their model is
built by name and loads ``golden_state_dict`` of its own key list (strict); its logits for
``golden_input`` at SIZES are either compared with the zoo model that loads the same weights the
way a user loads their checkpoint (one JSON line per model and size), or, with ``--write``,
stored as the golden fixture that ``test_nat_golden_logits`` checks without their code. ``--ops``
also compares the attention op itself with NATTEN 0.14's over kernel sizes and dilations.

    PYTHONPATH=natten-0.14:classification python tests/nat_authors_logits.py --ops 100 nat_mini dinat_tiny
    PYTHONPATH=... python tests/nat_authors_logits.py --write tests/fixtures/nat_golden.json dinat_mini nat_small
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from golden import golden_input, golden_state_dict  # noqa: E402

# the sizes: the paper's; one that no window divides (maps 50x66 ... 7x9); one whose last maps
# (4x6, 2x3) are smaller than kernel x dilation, which their NATTEN module zero-pads and crops
SIZES = [(224, 224), (200, 264), (64, 96)]
# bias tables of unit scale (their init is 0.02) so that a wrongly indexed bias shows; layer scales
# (their init 1e-5) large enough that the blocks count
SCALES = {"rpb": 1.0, "gamma1": 0.5, "gamma2": 0.5}


def authors_model(name):
    import natten
    if not hasattr(natten, "NeighborhoodAttention2D") or hasattr(natten, "context"):
        sys.exit(f"NATTEN {natten.__version__} from {natten.__file__}: need a release with relative "
                 f"positional bias (0.14.x) first on PYTHONPATH")
    model = getattr(__import__("dinat" if name.startswith("dinat") else "nat"), name)().eval()
    keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(golden_state_dict(keys, SCALES))
    return model, keys


def logits(model, flip_bias=False):
    """The model's logits at SIZES; with ``flip_bias`` its bias tables indexed by query - key
    instead of key - query, the control that shows a fixture would catch a wrong index."""
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("rpb")}
    with torch.no_grad():
        if flip_bias:
            for n, p in model.named_parameters():
                if n in tables:
                    p.copy_(p.flip(-1, -2))
        out = {f"{h}x{w}": model(golden_input((1, 3, h, w)))[0] for h, w in SIZES}
        for n, p in model.named_parameters():
            if n in tables:
                p.copy_(tables[n])
    return out


def compare_ops(cases):
    """The zoo's reference na2d (tiled and gather paths) against NATTEN 0.14's rpb op, the one the
    authors' module calls, on ``cases`` random cases (kernel 3 to 13, dilation 1 to 4, maps up to 9
    wider than kernel x dilation) in float64: the largest difference over the output and the
    gradients of q, k, v and the bias table."""
    import random
    from natten.functional import natten2dav, natten2dqkrpb
    from zoo.kernels import na2d, neighborhood
    rng, worst, use_tiles = random.Random(0), 0.0, neighborhood.use_tiles
    for case in range(cases):
        ks, dil = rng.choice([3, 5, 7, 9, 11, 13]), rng.randint(1, 4)
        h, w = rng.randint(ks * dil, ks * dil + 9), rng.randint(ks * dil, ks * dil + 9)
        g = torch.Generator().manual_seed(case)
        shape = (rng.randint(1, 2), rng.randint(1, 3), h, w, rng.choice([4, 8, 16]))  # their (B, heads, H, W, D)
        q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        rpb = torch.randn(shape[1], 2 * ks - 1, 2 * ks - 1, generator=g, dtype=torch.float64, requires_grad=True)
        ref = natten2dav(natten2dqkrpb(q * shape[-1] ** -0.5, k, rpb, ks, dil).softmax(-1), v, ks, dil)
        grad = torch.randn_like(ref)
        want = [ref, *torch.autograd.grad(ref, (q, k, v, rpb), grad)]
        for tiles in (True, False):
            neighborhood.use_tiles = lambda *a, tiles=tiles: tiles
            try:
                out = na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), ks, 1, dil, rpb=rpb).permute(0, 3, 1, 2, 4)
                got = [out, *torch.autograd.grad(out, (q, k, v, rpb), grad)]
            finally:
                neighborhood.use_tiles = use_tiles
            worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(want, got)])
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="nat_mini ... dinat_large")
    p.add_argument("--write", type=Path, help="write the golden fixture here instead of comparing")
    p.add_argument("--ops", type=int, default=0, metavar="N", help="also compare the attention op on N random cases")
    a = p.parse_args(argv)
    if a.ops:
        print(json.dumps({"ops": a.ops, "diff": compare_ops(a.ops)}), flush=True)
    fixture = {"source": "SHI-Labs/Neighborhood-Attention-Transformer classification/nat.py, dinat.py on "
                         "NATTEN 0.14.6 (CPU build), fp32; written by tests/nat_authors_logits.py --write",
               "models": {}}
    for name in a.names:
        theirs, keys = authors_model(name)
        ref, control = logits(theirs), logits(theirs, flip_bias=True)
        gap = min((ref[s] - control[s]).abs().max().item() for s in ref)
        if a.write:
            fixture["models"][name] = {"keys": keys, "control_min_diff": gap,
                                       **{f"logits_{s}": [float(f"{x:.7g}") for x in v.tolist()] for s, v in ref.items()}}
            continue
        import timm
        import zoo  # noqa: F401  (registers the zoo_* models)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.pth"
            torch.save({"model": theirs.state_dict()}, path)  # the layout of their released .pth files
            ours = timm.create_model(f"zoo_{name}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        got = logits(ours.eval())
        for s in ref:
            print(json.dumps({"model": name, "size": s, "scale": ref[s].abs().max().item(),
                              "diff": (ref[s] - got[s]).abs().max().item(), "control": gap,
                              "params": [sum(p.numel() for p in m.parameters()) for m in (theirs, ours)]}),
                  flush=True)
    if a.write:
        a.write.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
