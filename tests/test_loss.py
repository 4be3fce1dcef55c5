"""CultureCLIPLoss (softmax and sigmoid families) against formulas re-written here in float64, against
open_clip's ClipLoss and SigLipLoss, and across 2 gloo ranks."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.loss import SigLipLoss

from cultureclip import schema
from cultureclip.loss import FAMILIES, VARIANTS, CultureCLIPLoss

B, D = 6, 16


def make_features(b=B, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    feats = {k: F.normalize(torch.randn(b, D, generator=g), dim=-1) for k in schema.FEATURE_KEYS}
    if requires_grad:
        for v in feats.values():
            v.requires_grad_(True)
    return feats


# ---- independent reference: loops over rows, log-softmax written out by hand ----
def ref_ce(logits):
    total = 0.0
    for i in range(logits.shape[0]):
        row = logits[i]
        total = total - (row[i] - torch.log(torch.exp(row).sum()))
    return total / logits.shape[0]


def ref_clip(I, T, s):
    return (ref_ce(s * I @ T.T) + ref_ce(s * T @ I.T)) / 2


def ref_negclip(I, T, H, s):
    return (ref_ce(s * I @ torch.cat([T, H]).T) + ref_ce(s * T @ I.T)) / 2


# sigmoid family: one binary decision per (image, text) pair, written as scalar loops in float64
def ref_pair(i_feat, t_feat, y, s, b):
    z = s * float(i_feat @ t_feat) + b
    return math.log1p(math.exp(-y * z))  # -log sigmoid(y z)


def ref_sigclip(I, T, s, b):
    n = I.shape[0]
    return sum(ref_pair(I[i], T[j], 1 if i == j else -1, s, b) for i in range(n) for j in range(n)) / n


def ref_signegclip(I, T, H, s, b):
    n = I.shape[0]
    twins = sum(ref_pair(I[i], H[j], -1, s, b) for i in range(n) for j in range(n)) / n
    return ref_sigclip(I, T, s, b) + twins


def ref_loss(f, variant, lc, lk, s, bias=None):
    Ip, In = f["pos_image"], f["neg_image"]
    Cp, Cn, Kp, Kn = f["pos_caption"], f["neg_caption"], f["pos_concept"], f["neg_concept"]
    if bias is None:
        clip, negclip = ref_clip, ref_negclip
    else:
        f = {k: v.double() for k, v in f.items()}
        s, bias = float(s), float(bias)
        clip = lambda I, T, s: ref_sigclip(I.double(), T.double(), s, bias)  # noqa: E731
        negclip = lambda I, T, H, s: ref_signegclip(I.double(), T.double(), H.double(), s, bias)  # noqa: E731
    cap_clip = clip(Ip, Cp, s)
    con_clip = clip(Ip, Kp, s)
    cap_neg = negclip(Ip, Cp, Cn, s) + negclip(In, Cn, Cp, s)
    con_neg = negclip(Ip, Kp, Kn, s) + negclip(In, Kn, Kp, s)
    return {
        "clip": cap_clip, "caption_clip": cap_clip, "concept_clip": con_clip,
        "caption_negclip": cap_neg, "concept_negclip": con_neg,
        "caption_concept_clip": lc * cap_clip + lk * con_clip,
        "caption_neg_concept_clip": lc * cap_neg + lk * con_clip,
        "caption_concept_neg": lc * cap_clip + lk * con_neg,
        "cultureclip": lc * cap_neg + lk * con_neg,
    }[variant]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_reference_formulas(variant):
    f = make_features()
    s = torch.tensor(14.3)
    two_terms = None not in VARIANTS[variant]
    weights = {"lambda_caption": 0.6, "lambda_concept": 0.4} if two_terms else {}
    out = CultureCLIPLoss(variant, **weights)(f, s)
    expected = ref_loss(f, variant, 0.6, 0.4, s)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert all(k == "loss" or k.endswith("_loss") for k in out)
    if two_terms:  # the defaults are the paper's 0.7 / 0.3
        torch.testing.assert_close(CultureCLIPLoss(variant)(f, s)["loss"], ref_loss(f, variant, 0.7, 0.3, s),
                                   rtol=1e-5, atol=1e-5)
    else:  # a weight a single-term loss would ignore is refused
        with pytest.raises(ValueError, match="takes no lambda"):
            CultureCLIPLoss(variant, lambda_caption=0.7)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sigmoid_variants_match_float64_reference(variant):
    f = {k: v.double() for k, v in make_features(seed=2).items()}
    s, b = torch.tensor(11.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)
    weights = {"lambda_caption": 0.6, "lambda_concept": 0.4} if None not in VARIANTS[variant] else {}
    out = CultureCLIPLoss(variant, family="sigmoid", **weights)(f, s, b)
    expected = ref_loss(f, variant, 0.6, 0.4, s, bias=b)
    assert abs(float(out["loss"]) - expected) < 1e-6 * max(1.0, abs(expected))
    # family None follows the model: a bias means sigmoid, none means softmax
    torch.testing.assert_close(CultureCLIPLoss(variant, **weights)(f, s, b)["loss"], out["loss"])
    softmax = CultureCLIPLoss(variant, **weights)(f, s)["loss"]
    torch.testing.assert_close(softmax, ref_loss(f, variant, 0.6, 0.4, s))


@pytest.mark.parametrize("bias", [-10.0, 0.0, 3.0])
def test_sigmoid_clip_equals_open_clip_siglip_loss(bias):
    f = make_features(seed=7)
    s, b = torch.tensor(112.0), torch.tensor(bias)
    for variant, text in (("clip", "pos_caption"), ("concept_clip", "pos_concept")):
        ours = CultureCLIPLoss(variant, family="sigmoid")(f, s, b)["loss"]
        theirs = SigLipLoss()(f["pos_image"], f[text], s, b)
        assert abs(float(ours) - float(theirs)) < 1e-6 * max(1.0, abs(float(theirs)))


def test_sigmoid_twin_is_an_explicit_negative_and_bias_is_used():
    # a twin caption close to the positive one must raise the sigmoid NegCLIP term, and the bias moves it
    f = make_features(seed=5)
    s, b = torch.tensor(30.0), torch.tensor(-5.0)
    loss = CultureCLIPLoss("caption_negclip", family="sigmoid")
    f["pos_caption"] = f["pos_image"]  # each image matches its caption perfectly ...
    f["neg_caption"] = f["pos_caption"]  # ... and its twin's caption is the same text: z = 30 - 5 on a -1 label
    clip_only = CultureCLIPLoss("caption_clip", family="sigmoid")(f, s, b)["loss"]
    assert loss(f, s, b)["loss"] > clip_only + 25 - 1  # -log sigmoid(-25) ~ 25 per image
    assert not torch.allclose(loss(f, s, b)["loss"], loss(f, s, b + 1)["loss"])
    # the softmax family ignores a bias exactly: a constant on every logit of a row leaves softmax unchanged
    soft = CultureCLIPLoss("caption_negclip", family="softmax")
    torch.testing.assert_close(soft(f, s, b)["loss"], soft(f, s)["loss"])


def test_family_is_resolved_from_the_model_and_checked():
    assert CultureCLIPLoss("clip").resolve_family(True) == "sigmoid"
    assert CultureCLIPLoss("clip").resolve_family(False) == "softmax"
    assert CultureCLIPLoss("clip", family="softmax").resolve_family(True) == "softmax"
    with pytest.raises(ValueError, match="loss.family"):
        CultureCLIPLoss("clip", family="siglip")
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        CultureCLIPLoss("clip", family="sigmoid")(make_features(), torch.tensor(10.0), torch.ones(2))


def test_clip_variant_equals_open_clip_clip_loss():
    f = make_features(seed=3)
    s = torch.tensor(100.0)
    ours = CultureCLIPLoss("clip")(f, s)["loss"]
    theirs = ClipLoss()(f["pos_image"], f["pos_caption"], s)
    torch.testing.assert_close(ours, theirs)


def test_zero_concept_weight_equals_open_clip():
    # caption_concept_clip with lambda_concept=0 reduces to plain CLIP on captions
    f = make_features(seed=4)
    s = torch.tensor(50.0)
    ours = CultureCLIPLoss("caption_concept_clip", lambda_caption=1.0, lambda_concept=0.0)(f, s)
    torch.testing.assert_close(ours["loss"], ClipLoss()(f["pos_image"], f["pos_caption"], s))


def test_twin_negatives_raise_loss_when_twin_text_is_close():
    # NegCLIP must penalise a twin caption that looks like the positive one; CLIP cannot see it
    f = make_features(seed=5)
    f["neg_caption"] = F.normalize(f["pos_caption"] + 0.05 * torch.randn(B, D), dim=-1)
    s = torch.tensor(30.0)
    clip_only = CultureCLIPLoss("caption_clip")(f, s)["loss"]
    neg = CultureCLIPLoss("caption_negclip")(f, s)["caption_negclip_loss"]
    assert neg > 2 * clip_only


def test_named_terms_unweighted_and_total_weighted():
    f = make_features(seed=6)
    s = torch.tensor(20.0)
    out = CultureCLIPLoss("cultureclip", lambda_caption=0.7, lambda_concept=0.3)(f, s)
    torch.testing.assert_close(out["loss"], 0.7 * out["caption_negclip_loss"] + 0.3 * out["concept_negclip_loss"])


def test_required_keys_only():
    loss = CultureCLIPLoss("concept_clip")
    assert set(loss.required_keys) == {schema.POS_IMAGE, schema.POS_CONCEPT}
    f = {k: v for k, v in make_features().items() if k in loss.required_keys}
    loss(f, torch.tensor(10.0))  # does not need the other four


def test_bad_inputs_raise():
    f = make_features()
    with pytest.raises(ValueError, match="unknown loss variant"):
        CultureCLIPLoss("negclip_typo")
    missing = dict(f)
    del missing[schema.NEG_CONCEPT]
    with pytest.raises(KeyError, match="neg_concept"):
        CultureCLIPLoss("cultureclip")(missing, torch.tensor(10.0))
    bad = dict(f)
    bad[schema.NEG_CAPTION] = bad[schema.NEG_CAPTION][:-1]
    with pytest.raises(ValueError, match="shape"):
        CultureCLIPLoss("cultureclip")(bad, torch.tensor(10.0))
    with pytest.raises(ValueError, match="scalar"):
        CultureCLIPLoss("clip")(f, torch.ones(2))


# ---- distributed: 2 gloo ranks must reproduce the single-process loss and gradient ----
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOO_VARIANTS = ("clip", "cultureclip")
GLOO_RUNS = [(v, fam) for v in GLOO_VARIANTS for fam in FAMILIES]


def _scale_bias(family):
    # the sigmoid runs also check the gradient of the bias, the parameter only that family uses
    return torch.tensor(10.0), (torch.tensor(-3.0, requires_grad=True) if family == "sigmoid" else None)


def _worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:  # every variant in one process group: starting the ranks is the expensive part
        for variant, family in GLOO_RUNS:
            full = make_features(b=B * world, seed=11)
            local = {k: v[rank * B:(rank + 1) * B].clone().requires_grad_(True) for k, v in full.items()}
            scale, bias = _scale_bias(family)
            out = CultureCLIPLoss(variant, family=family)(local, scale, bias)
            out["loss"].backward()
            grads = {k: v.grad for k, v in local.items() if v.grad is not None}
            if bias is not None:
                grads["logit_bias"] = bias.grad
            loss = out["loss"].detach().clone()
            dist.all_reduce(loss)
            torch.save({"loss": loss / world, "grads": grads},
                       os.path.join(result_dir, f"{variant}-{family}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    world, out = 2, tmp_path_factory.mktemp("gloo")
    mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True, start_method="spawn")
    return world, out


@pytest.mark.slow  # two spawned processes: ~12 s of start-up
@pytest.mark.parametrize("variant, family", GLOO_RUNS)
def test_gather_across_two_gloo_ranks_matches_single_process(variant, family, gloo_results):
    world, result_dir = gloo_results
    full = make_features(b=B * world, seed=11, requires_grad=True)
    scale, bias = _scale_bias(family)
    ref = CultureCLIPLoss(variant, family=family)(full, scale, bias)["loss"]
    ref.backward()
    for rank in range(world):
        res = torch.load(result_dir / f"{variant}-{family}-rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(res["loss"], ref.detach(), rtol=1e-5, atol=1e-6)
        if bias is not None:  # a parameter DDP averages: the mean over ranks is the global gradient
            others = [torch.load(result_dir / f"{variant}-{family}-rank{r}.pt", weights_only=True)["grads"]
                      for r in range(world)]
            torch.testing.assert_close(sum(o["logit_bias"] for o in others) / world, bias.grad,
                                       rtol=1e-5, atol=1e-6)
        for k, g in res["grads"].items():
            if k == "logit_bias":
                continue
            # all_gather's backward sums every rank's gradient onto the owner of the rows: each rank
            # holds d(sum_r L_r)/df = world * dL/df, which DDP's averaging over ranks turns into dL/dθ
            expected = world * full[k].grad[rank * B:(rank + 1) * B]
            torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
        # negatives really span both ranks: a rank-local loss would differ
        assert res["grads"], "no gradient reached the features"
    local_only = CultureCLIPLoss(variant, family=family)({k: v[:B].detach() for k, v in full.items()}, scale,
                                                         bias)["loss"]
    assert not torch.allclose(local_only, ref.detach())
