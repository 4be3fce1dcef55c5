"""Every field name of the twin-pair data, in one place.

A twin pair is one WebDataset sample (one ``__key__``) holding both twins, so both always land in the
same batch::

    pair0000042.pos.jpg   positive image (jpg, png or webp)
    pair0000042.neg.jpg   twin (negative) image
    pair0000042.json      {"pos_caption", "neg_caption", "pos_concept", "neg_concept",
                           optional "pos_country", "neg_country", "category", "pair_id",
                           "pos_context", "neg_context" (strings), "pos_features", "neg_features"
                           (lists of strings)}

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
POS_CONTEXT = "pos_context"  # a short description of the concept (where, when, what it is)
NEG_CONTEXT = "neg_context"
POS_FEATURES = "pos_features"  # key visual features, a list of strings
NEG_FEATURES = "neg_features"
REQUIRED_TEXT_FIELDS = (POS_CAPTION, NEG_CAPTION, POS_CONCEPT, NEG_CONCEPT)
OPTIONAL_FIELDS = (POS_COUNTRY, NEG_COUNTRY, CATEGORY, PAIR_ID, POS_CONTEXT, NEG_CONTEXT, POS_FEATURES, NEG_FEATURES)

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


# =====================================================================================================
# Curation records (``python -m cultureclip.curate``). Every stage writes JSON records; these are their
# fields. ``pos``/``neg`` sides of a twin use the prefixes above (e.g. ``pos_concept``).
# =====================================================================================================
REC_KEY = "key"  # a job's key: hash of the upstream fields it reads, its prompt texts, model id and settings
REC_STAGE = "stage"
REC_ERROR = "error"  # errors files: the reason (a short word) ...
REC_MESSAGE = "message"  # ... and the full message
REC_ATTEMPTS = "attempts"
REC_WHERE = "where"  # the input file:line a record came from
CONCEPT = "concept"
COUNTRY = "country"
CONTEXT = "context"
FEATURES = "features"  # key visual features, a list of strings
CAPTION = "caption"
CAPTIONS = "captions"  # a list of captions of one concept
POS_CAPTIONS = "pos_captions"
NEG_CAPTIONS = "neg_captions"
TWIN_ID = "twin_id"  # key of a twin pair (category, both concepts and countries)
SIDE = "side"  # "pos" or "neg": which side of the twin pair a rendered image belongs to
SEED_INDEX = "seed_index"
SEED = "seed"
IMAGE_FILE = "image"  # path of a rendered image, relative to the stage folder
IMAGE_SHA256 = "image_sha256"
RENDER_KEY = "render_key"
MODEL_ID = "model"
PROMPT = "prompt"
# render settings stored with every rendered image
WIDTH = "width"
HEIGHT = "height"
STEPS = "steps"
GUIDANCE = "guidance"
NEGATIVE_PROMPT = "negative_prompt"
# the judge's answer: three 1-5 scores and the twin check
SCORE_AUTHENTICITY = "authenticity"
SCORE_CONSISTENCY = "consistency"
SCORE_FIDELITY = "cultural_fidelity"
SCORES = (SCORE_AUTHENTICITY, SCORE_CONSISTENCY, SCORE_FIDELITY)
TWIN_CHOICE = "twin_choice"  # the concept name the judge picked when shown both names
PICKS_OWN = "picks_own"  # whether that is the image's own concept
REASON = "reason"
TWIN_CONCEPT = "twin_concept"  # judge records: the other concept of the twin pair ...
TWIN_COUNTRY = "twin_country"  # ... and its country

# ---- upstream stages (concepts, dedup, twins, captions) ----
NATIVE_NAME = "native_name"  # the concept's name in its own language and script
SOURCE = "source"  # where a concept or twin candidate came from: "top_down", "wiki", "seed", "llm", "mined"
CONCEPT_ID = "concept_id"  # key of a concept (name, country, category)
CONCEPTS = "concepts"  # a concepts record's accepted concepts (a list)
REJECTED = "rejected"  # items a stage turned down, each with a reason
MERGED = "merged"  # dedup: the concepts merged into this one, each with its similarity and reason
MERGED_WITH = "merged_with"  # dedup: the concept a merged one was found to duplicate
SIMILARITY = "similarity"
TWINS = "twins"  # a twins record's verified twins, best first
VERIFIED = "verified"  # twins: how many candidates passed the verifier
VERIFIER_SIMILARITY = "verifier_similarity"  # twins: the verifier's 1-5 visual similarity
VERIFIER_REASON = "verifier_reason"
VISUALLY_SIMILAR = "visually_similar"  # the twin verifier's three questions
CULTURALLY_DISTINCT = "culturally_distinct"
EXISTS = "exists"
SCENE = "scene"
SCENES = "scenes"  # a caption set's scenes, one per caption
ROUNDS = "rounds"  # caption requests a caption set took
# WIT-style Wikipedia image-text rows (the bottom-up concepts input)
WIT_PAGE_URL = "page_url"
WIT_PAGE_TITLE = "page_title"
WIT_SECTION_TITLE = "section_title"
WIT_REFERENCE_DESCRIPTION = "caption_reference_description"
WIT_PAGE_DESCRIPTION = "context_page_description"
WIT_SECTION_DESCRIPTION = "context_section_description"
WIT_IMAGE_URL = "image_url"
WIT_IMAGE_PATH = "image_path"  # a local image file (our addition: rows whose image was downloaded)

# ---- the reference pipeline's files (CulTwin JSON/JSONL), read by the curation importer ----
REF_SAMPLE_ID = "sample_id"
REF_POS_CAPTION_ID = "pos_caption_id"
REF_NEG_CAPTION_ID = "neg_caption_id"
REF_POS_ALL_CAPTIONS = "pos_all_captions"
REF_NEG_ALL_CAPTIONS = "neg_all_captions"
REF_METADATA = "metadata"
REF_VISUAL_FEATURES = "visual_features"
REF_CATEGORY_DESCRIPTION = "category_description"

# ---- the Hugging Face ``datasets`` folder of an export (Parquet, one row per pair) ----
# columns: HF_SAMPLE_KEY, POS_IMAGE and NEG_IMAGE (``Image`` features), the pair's json fields, and, from
# curation, the judge's answer for each image under "<side>_<field>" (HF_JUDGE_COLUMNS)
HF_SAMPLE_KEY = "sample_key"  # the pair's WebDataset key
HF_DATA_DIR = "data"  # Parquet files: data/<split>-00000-of-00003.parquet
HF_CARD = "README.md"  # the dataset card (YAML front matter + markdown), as the Hub reads it
HF_JUDGE_FIELDS = SCORES + (TWIN_CHOICE, PICKS_OWN)
HF_JUDGE_COLUMNS = tuple(f"{side}_{f}" for side in (POS_PREFIX, NEG_PREFIX) for f in HF_JUDGE_FIELDS)
