"""The FLOP-ratio limit of the training benchmark: open_clip's FLOPs per image divided by ours.

Both steps are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
convolutions and attention, forward and backward; the optimizer's element-wise update is not
counted on either side) on the same batches of the benchmark's shards:

- open_clip: ``2B`` images, each with its one caption at the full context length (77 tokens for the
  OpenAI-style architectures), ``ClipLoss``;
- ours: ``B`` pairs = ``2B`` images, two captions and two concept names per pair (the variant's loss
  decides which are encoded), with the exact length trimming and concept dedup of ``encode_text``.

If the step time were proportional to the FLOPs, ours / open_clip images/s would equal this ratio:
it is the speed-up to expect, and ``achieved / limit`` says how close the implementation comes.
A benchmark helper, not part of the package; ``train_harness.run_side("flops", cfg)`` calls it.
"""
from __future__ import annotations

import statistics

import open_clip
import torch

from cultureclip import schema
from cultureclip.flops import count_flops  # math-backend attention, so the CPU count includes it
from cultureclip.data.pipeline import build_twin_pipeline, make_loader
from cultureclip.loss import CultureCLIPLoss
from cultureclip.model import CultureCLIP
from cultureclip.text_length import trim_plan, trimmed_length


def step_flops(model_name: str, twin_dir: str, batch_size: int, variant: str, seed: int = 0, batches: int = 3,
               concept_context: int | None = None) -> dict:
    """FLOPs per image of one training step, ours and open_clip's, averaged over ``batches`` batches.

    Returns:
        ``ours_per_image``, ``open_clip_per_image`` (FLOPs), ``limit`` (their ratio, open_clip / ours),
        the mean trimmed lengths of caption and concept batches, the fraction of distinct concept rows,
        and the context length open_clip encodes.
    """
    from cultureclip.lit_module import CultureCLIPModule  # Lightning: imported only where needed

    torch.manual_seed(seed)
    enc = CultureCLIP.from_pretrained(model_name, pretrained=None)
    pipe = build_twin_pipeline(twin_dir, enc.preprocess_train, enc.tokenizer, batch_size, train=True, seed=seed,
                               concept_context_length=concept_context if enc.supports_short_context else None)
    it = iter(make_loader(pipe, num_workers=0))
    module = CultureCLIPModule(enc, CultureCLIPLoss(variant), optimizer=None)
    oc = open_clip.create_model(model_name, pretrained=None, output_dict=True)
    oc_loss = open_clip.ClipLoss()
    plan = trim_plan(enc.model)
    ours, theirs, images, caption_len, concept_len, distinct = 0, 0, 0, [], [], []
    for _ in range(batches):
        b = next(it)
        ours += count_flops(lambda: module.backward_over([b], backward=torch.Tensor.backward))
        pixels = torch.cat([b[schema.POS_IMAGE], b[schema.NEG_IMAGE]])  # [2B, 3, H, W]
        captions = torch.cat([b[k] for k in schema.CAPTION_KEYS])  # [2B, 77]: one caption per image
        concepts = torch.cat([b[k] for k in schema.CONCEPT_KEYS])  # [2B, L_concept]

        def open_clip_step():
            out = oc(pixels, captions)
            oc_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()

        theirs += count_flops(open_clip_step)
        images += pixels.shape[0]
        if plan is not None:
            caption_len.append(trimmed_length(captions, *plan))
            concept_len.append(trimmed_length(concepts, *plan))
        distinct.append(len(torch.unique(concepts, dim=0)) / len(concepts))
    mean = (lambda xs: statistics.mean(xs) if xs else None)
    return {"ours_per_image": ours / images, "open_clip_per_image": theirs / images, "limit": theirs / ours,
            "batches": batches, "open_clip_context": int(captions.shape[1]),
            "trimmed_caption_len": mean(caption_len), "trimmed_concept_len": mean(concept_len),
            "distinct_concept_frac": mean(distinct)}
