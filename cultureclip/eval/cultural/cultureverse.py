"""CultureVerse (CultureVLM, Liu et al. 2025) image-recognition questions as zero-shot multiple choice.

CultureVerse has three question types (image recognition, cultural knowledge, scene understanding);
for a CLIP model only image recognition ("which concept is shown") is a zero-shot task, so only those
rows are scored: the image against the option texts (through ``template``), softmax, argmax. The
options come with the file, so nothing is drawn: ``seeds``/``protocol`` are refused rather than ignored.

Input: the released question files from a local path: one ``.json`` (a list of rows, or an
``{id: row}`` object) or ``.jsonl`` file, a folder of them (every data file directly inside, sorted
by name), or a list of files; ``.parquet`` too when ``pyarrow`` is installed. Fields (rename with
``fields={"answer": "label", ...}`` when the files use other names):

- ``image``: path relative to the file's folder or to ``images_dir``;
- ``question_type``: a row is used when ``question_type_match`` ("recognition") occurs in its
  lower-cased type with ``_``/``-`` read as spaces ("Image Recognition", "image_recognition");
- ``options``: a list of texts, or an object ``{"A": text, ...}`` (keys sorted);
- ``answer``: a letter ("B", "(b)", "B."), a key of the options object, a 0-based index, or the text;
- ``country``, ``topic``; optional ``continent``, else derived from ``country`` with the table below
  (a country not in it counts as continent ``unknown``, reported in ``n_unknown_continent``).

Accuracy is reported overall and per continent, country and topic (``acc/continent=Asia``).
"""
from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from cultureclip.eval.cultural import RowError, check_on_bad_row, get_field, is_file_list, keep_bad_row, read_rows
from cultureclip.eval.multiple_choice import (MCItem, accuracy_report, make_header, score_items,
                                              skip_summary)

if TYPE_CHECKING:  # scoring imports torch lazily; building items does not need it
    from cultureclip.model import CultureCLIP

DEFAULT_FIELDS = {"image": "image", "question_type": "question_type", "options": "options", "answer": "answer",
                  "country": "country", "topic": "topic", "continent": "continent"}
UNKNOWN = "unknown"
# Common English names and aliases; transcontinental countries sit where they are usually grouped.
_CONTINENT_COUNTRIES = {
    "Africa": "Algeria, Angola, Benin, Botswana, Burkina Faso, Burundi, Cabo Verde, Cape Verde, Cameroon, "
              "Central African Republic, Chad, Comoros, Democratic Republic of the Congo, DR Congo, DRC, "
              "Republic of the Congo, Congo, Djibouti, Egypt, Equatorial Guinea, Eritrea, Eswatini, Swaziland, "
              "Ethiopia, Gabon, Gambia, Ghana, Guinea, Guinea-Bissau, Ivory Coast, Cote d'Ivoire, Kenya, Lesotho, "
              "Liberia, Libya, Madagascar, Malawi, Mali, Mauritania, Mauritius, Morocco, Mozambique, Namibia, "
              "Niger, Nigeria, Rwanda, Sao Tome and Principe, Senegal, Seychelles, Sierra Leone, Somalia, "
              "Somaliland, South Africa, South Sudan, Sudan, Tanzania, Togo, Tunisia, Uganda, Western Sahara, "
              "Zambia, Zimbabwe",
    "Asia": "Afghanistan, Armenia, Azerbaijan, Bahrain, Bangladesh, Bhutan, Brunei, Cambodia, China, Georgia, "
            "Hong Kong, India, Indonesia, Iran, Iraq, Israel, Japan, Jordan, Kazakhstan, Kuwait, Kyrgyzstan, Laos, "
            "Lebanon, Macau, Macao, Malaysia, Maldives, Mongolia, Myanmar, Burma, Nepal, North Korea, Oman, "
            "Pakistan, Palestine, Philippines, Qatar, Saudi Arabia, Singapore, South Korea, Korea, Sri Lanka, "
            "Syria, Taiwan, Tajikistan, Thailand, Tibet, Timor-Leste, East Timor, Turkey, Turkiye, Turkmenistan, "
            "United Arab Emirates, UAE, Uzbekistan, Vietnam, Viet Nam, Yemen",
    "Europe": "Albania, Andorra, Austria, Belarus, Belgium, Bosnia and Herzegovina, Bulgaria, Croatia, Cyprus, "
              "Czech Republic, Czechia, Denmark, England, Estonia, Faroe Islands, Finland, France, Germany, Greece, "
              "Hungary, Iceland, Ireland, Italy, Kosovo, Latvia, Liechtenstein, Lithuania, Luxembourg, Malta, "
              "Moldova, Monaco, Montenegro, Netherlands, North Macedonia, Macedonia, Northern Ireland, Norway, "
              "Poland, Portugal, Romania, Russia, San Marino, Scotland, Serbia, Slovakia, Slovenia, Spain, Sweden, "
              "Switzerland, Ukraine, United Kingdom, UK, Great Britain, Vatican City, Wales",
    "North America": "Antigua and Barbuda, Bahamas, Barbados, Belize, Bermuda, Canada, Costa Rica, Cuba, Dominica, "
                     "Dominican Republic, El Salvador, Greenland, Grenada, Guatemala, Haiti, Honduras, Jamaica, "
                     "Mexico, Nicaragua, Panama, Puerto Rico, Saint Kitts and Nevis, Saint Lucia, "
                     "Saint Vincent and the Grenadines, Trinidad and Tobago, United States, "
                     "United States of America, USA, US",
    "South America": "Argentina, Bolivia, Brazil, Chile, Colombia, Ecuador, French Guiana, Guyana, Paraguay, Peru, "
                     "Suriname, Uruguay, Venezuela",
    "Oceania": "Australia, Fiji, French Polynesia, Guam, Kiribati, Marshall Islands, Micronesia, Nauru, "
               "New Caledonia, New Zealand, Palau, Papua New Guinea, Samoa, Solomon Islands, Tonga, Tuvalu, Vanuatu",
}


def _norm(name: str) -> str:
    """Lower-case ASCII without accents, single spaces and no leading "the" ("Côte d'Ivoire" matches)."""
    name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    name = re.sub(r"\s+", " ", name.strip().lower())
    return name[4:] if name.startswith("the ") else name


COUNTRY_TO_CONTINENT = {_norm(c): cont for cont, names in _CONTINENT_COUNTRIES.items() for c in names.split(", ")}


def continent_of(country: str, table: Optional[Mapping[str, str]] = None) -> str:
    """The continent of a country name (``"unknown"`` when not in the table)."""
    return (table or COUNTRY_TO_CONTINENT).get(_norm(country), UNKNOWN)


def resolve_answer(answer: Any, keys: Optional[Sequence[str]], texts: Sequence[str]) -> int:
    """Index of the correct option from a letter, an options-object key, a 0-based index or the text."""
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise ValueError(f"answer {answer!r} must be a letter, an index or an option text")
    if isinstance(answer, int):
        index = answer
    else:
        a = answer.strip()
        letter = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", a)
        if keys is not None and a in keys:
            index = list(keys).index(a)
        elif letter:
            index = ord(letter.group(1).upper()) - ord("A")
        elif a in texts:
            index = list(texts).index(a)
        elif a.isdigit():
            index = int(a)
        else:
            raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options {list(texts)}")
    if not 0 <= index < len(texts):
        raise ValueError(f"answer {answer!r} points outside the {len(texts)} options")
    return index


def load_rows(source: Any, split: Optional[str] = None, revision: Optional[str] = None, images_dir=None,
              fields: Optional[Mapping[str, str]] = None):
    """Raw question rows (see :func:`cultureclip.eval.cultural.read_rows`); ``split=None`` reads
    every data file of a folder."""
    f = {**DEFAULT_FIELDS, **(fields or {})}
    return read_rows(source, split, revision, image_fields=(f["image"],), images_dir=images_dir)


def _item(row, f: Mapping[str, str], template: str, table) -> MCItem:
    options = get_field(row, f["options"])
    if isinstance(options, Mapping):
        keys = sorted(options)
        texts = [str(options[k]) for k in keys]
    elif isinstance(options, (list, tuple)):
        keys, texts = None, [str(o) for o in options]
    else:
        raise RowError(f"{row.where}: field {f['options']!r} must be a list or an object, got {type(options).__name__}")
    if len(texts) < 2:
        raise RowError(f"{row.where}: field {f['options']!r} needs at least 2 options, got {len(texts)}")
    raw_answer = get_field(row, f["answer"])
    try:
        answer = resolve_answer(raw_answer, keys, texts)
    except ValueError as e:
        raise RowError(f"{row.where}: field {f['answer']!r}: {e}") from e
    country, topic = str(get_field(row, f["country"])), str(get_field(row, f["topic"]))
    continent = row.data.get(f["continent"]) or continent_of(country, table)
    meta = {"continent": str(continent), "country": country, "topic": topic, "where": row.where}
    return MCItem(get_field(row, f["image"]), tuple(template.format(option=t) for t in texts), answer, meta)


def build_items(rows, question_type_match: Optional[str] = "recognition", template: str = "{option}",
                fields: Optional[Mapping[str, str]] = None, continents: Optional[Mapping[str, str]] = None,
                on_bad_row: str = "raise") -> tuple[list[MCItem], list[str], int]:
    """``(items of the image-recognition rows, bad-row messages, number of other-type rows)``.

    Args:
        rows: :class:`~cultureclip.eval.cultural.SourceRow` list from :func:`load_rows`.
        question_type_match: substring of the normalised question type that selects a row
            (``None``: every row is used and no type field is needed).
        template: turns an option text into the text scored against the image (``{option}``).
        fields: renames of the default field names.
        continents: ``{normalised country: continent}`` replacing the shipped table.
        on_bad_row: ``"raise"`` or ``"skip"`` (returned as messages).
    """
    check_on_bad_row(on_bad_row)
    f = {**DEFAULT_FIELDS, **(fields or {})}
    table = {_norm(k): v for k, v in continents.items()} if continents else None
    items, bad, n_other = [], [], 0
    for row in rows:
        try:
            if question_type_match is not None:
                qtype = re.sub(r"[\s_-]+", " ", str(get_field(row, f["question_type"])).lower())
                if question_type_match not in qtype:
                    n_other += 1
                    continue
            items.append(_item(row, f, template, table))
        except RowError as e:
            keep_bad_row(e, on_bad_row, bad)
    return items, bad, n_other


def evaluate(model: CultureCLIP, source: Any, split: Optional[str] = None, revision: Optional[str] = None,
             seeds: Optional[Sequence[int]] = None, protocol: Optional[str] = None, batch_size: int = 64,
             num_workers: int = 0, amp: bool = True, on_error: str = "skip", on_bad_row: str = "raise",
             images_dir=None, question_type_match: Optional[str] = "recognition", template: str = "{option}",
             fields: Optional[Mapping[str, str]] = None, continents: Optional[Mapping[str, str]] = None,
             group_keys: Sequence[str] = ("continent", "country", "topic")) -> tuple[dict, dict]:
    """CultureVerse image-recognition accuracy, overall and per continent, country and topic.

    Args:
        model: the CLIP model.
        source: question file(s) or folder; split: a split name in a folder, or ``None`` (all files).
        revision: recorded in the header only.
        seeds, protocol: must stay None: nothing is drawn (a value would be silently meaningless).
        batch_size, num_workers, amp: image scoring settings.
        on_error: undecodable or missing image: ``"skip"`` (counted as ``n_skipped``) or ``"raise"``.
        on_bad_row: row with a missing or unusable field: ``"raise"`` or ``"skip"`` (``n_bad_rows``).
        images_dir, question_type_match, template, fields, continents: see :func:`build_items`.
        group_keys: metadata keys reported per group.

    Returns:
        ``(metrics, header)`` for ``write_result``.
    """
    if seeds is not None or protocol is not None:
        raise ValueError(f"CultureVerse takes no seeds/protocol (got seeds={seeds!r}, protocol={protocol!r}): "
                         f"its options come with the files and nothing is drawn")
    raw = load_rows(source, split, revision, images_dir, fields)
    items, bad, n_other = build_items(raw, question_type_match, template, fields, continents, on_bad_row)
    preds = score_items(model, items, batch_size, num_workers, amp, on_error)
    metrics = accuracy_report(preds, group_keys)
    unknown = sorted({p.meta["country"] for p in preds if p.meta["continent"] == UNKNOWN and p.skipped is None})
    metrics["n_unknown_continent"] = sum(p.meta["continent"] == UNKNOWN for p in preds if p.skipped is None)
    metrics["n_bad_rows"] = len(bad)
    sources = ",".join(map(str, source)) if is_file_list(source) else str(source)
    header = make_header(task="cultureverse_recognition", dataset=sources, split=split, revision=revision,
                         seeds=None, protocol=None, metrics=metrics, n_rows=len(raw), n_other_types=n_other,
                         n_bad_rows=len(bad), bad_rows=bad[:5], skipped=skip_summary(preds),
                         unknown_countries=unknown, template=template, question_type_match=question_type_match,
                         draws="none: the options come from the files")
    return metrics, header
