"""Every field name of the twin-pair data, in one place.

A twin pair is one WebDataset sample (one ``__key__``) holding both twins, so both always land in the
same batch::

    pair0000042.pos.jpg   positive image (jpg, png or webp)
    pair0000042.neg.jpg   twin (negative) image
    pair0000042.json      {"pos_caption", "neg_caption", "pos_concept", "neg_concept",
                           optional "pos_country", "neg_country", "category", "pair_id"}

No other module spells these strings; import them from here.
"""
from collections.abc import Mapping

# ---- tar members (webdataset groups files by the part of the name before the first dot) ----
KEY = "__key__"
URL = "__url__"
META = "json"
POS_PREFIX = "pos"
NEG_PREFIX = "neg"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
POS_IMAGE_MEMBERS = tuple(f"{POS_PREFIX}.{e}" for e in IMAGE_EXTS)  # "pos.jpg", ...
NEG_IMAGE_MEMBERS = tuple(f"{NEG_PREFIX}.{e}" for e in IMAGE_EXTS)

# ---- json fields of one pair ----
POS_CAPTION = "pos_caption"
NEG_CAPTION = "neg_caption"
POS_CONCEPT = "pos_concept"
NEG_CONCEPT = "neg_concept"
POS_COUNTRY = "pos_country"
NEG_COUNTRY = "neg_country"
CATEGORY = "category"
PAIR_ID = "pair_id"
REQUIRED_TEXT_FIELDS = (POS_CAPTION, NEG_CAPTION, POS_CONCEPT, NEG_CONCEPT)
OPTIONAL_FIELDS = (POS_COUNTRY, NEG_COUNTRY, CATEGORY, PAIR_ID)

# ---- the authors' JSON/JSONL rows (CultureCLIP reference code) ----
POS_IMAGE_PATH = "pos_image_path"
NEG_IMAGE_PATH = "neg_image_path"

# ---- batch keys and feature keys (the loss consumes features under the same names) ----
POS_IMAGE = "pos_image"
NEG_IMAGE = "neg_image"
IMAGE_KEYS = (POS_IMAGE, NEG_IMAGE)
CAPTION_KEYS = (POS_CAPTION, NEG_CAPTION)
CONCEPT_KEYS = (POS_CONCEPT, NEG_CONCEPT)
TEXT_KEYS = CAPTION_KEYS + CONCEPT_KEYS
FEATURE_KEYS = IMAGE_KEYS + TEXT_KEYS
# raw strings kept next to the token ids, e.g. "pos_concept_text", for evaluation and logging
TEXT_SUFFIX = "_text"
# number of samples the pipeline skipped (bad member, undecodable image) since the previous batch
N_SKIPPED = "n_skipped"

# ---- general image-text shards (open_clip's layout), the replay stream of training ----
# one sample per key: an image member (jpg, jpeg, png or webp) and a caption member, as open_clip reads them
REPLAY_IMAGE_MEMBERS = IMAGE_EXTS
REPLAY_TEXT_MEMBER = "txt"
# batch keys of a replay batch, and the feature keys the loss reads them under
REPLAY_IMAGE = "replay_image"
REPLAY_TEXT = "replay_text"
# features of the replay images under the frozen starting model (feature distillation)
REPLAY_TEACHER_IMAGE = "replay_teacher_image"
REPLAY_KEYS = (REPLAY_IMAGE, REPLAY_TEXT)
# skips of the replay stream since its previous batch, carried in the merged training batch
REPLAY_N_SKIPPED = "replay_n_skipped"

# ---- files stored next to the shards ----
SIZES_FILE = "sizes.json"  # {"shard-000000.tar": n_pairs, ...}, as open_clip reads it
SHARD_PATTERN = "shard-%06d.tar"


def is_skip_report(batch) -> bool:
    """Whether a pipeline item is a *skip report* rather than a batch.

    A stream that ends with skipped samples and no batch left to carry their count (e.g. a loader
    worker whose shards hold no valid pair) yields ``{N_SKIPPED: n}``: no images, no texts. Consumers
    add ``batch[N_SKIPPED]`` to their skip count and otherwise ignore it.
    """
    return isinstance(batch, Mapping) and N_SKIPPED in batch and POS_IMAGE not in batch
