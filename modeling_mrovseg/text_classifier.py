"""Open-vocabulary classification: class names -> prompt-ensembled CLIP text embeddings -> cosine logits."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_mrovseg import normalize_class_name

# CLIP's text context: prompts longer than this many tokens are truncated.
CLIP_CONTEXT_LENGTH = 77


def split_synonyms(label: str) -> list[str]:
    """`"sofa, couch"` -> `["sofa", "couch"]`; each synonym is embedded and the embeddings averaged."""
    if not isinstance(label, str):
        raise ValueError(f"Class names must be strings, got {type(label).__name__}: {label!r}.")
    synonyms = [normalize_class_name(name) for name in label.split(",") if name.strip()]
    if not synonyms:
        raise ValueError(f"Class name {label!r} is empty.")
    return synonyms


def _read_text_file(path: Path, what: str) -> str:
    """A text file as Windows tools write it too: UTF-8 with or without a BOM (Notepad), or UTF-16 with its BOM
    (Windows PowerShell's `>` and `Out-File`, which said "not text"); other encodings are named as not UTF-8."""
    data = path.read_bytes()
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8") from None


def parse_class_names(value: str | Sequence[str] | None, allow_files: bool = True) -> list[str] | None:
    """
    The one reading of class names given by users: a list is taken as is (an entry may carry synonyms, "sofa,
    couch"), and so is a config's id2label ({0: "sky", 1: "road"}, in id order); a string is such a list in JSON
    ('["sky", "sofa, couch"]'), a file (unless `allow_files=False`, as for text typed into a web page) holding a
    JSON list, an id2label mapping ({"0": "sky", ...}), a class table (.csv, .tsv) or one class per line, or names
    separated by ";" (each may carry synonyms) or, without any ";", by "," (single names); a string of several
    lines is read as a file's text. None stays None.
    """
    if value is None:
        return None
    if isinstance(value, Mapping) and all(isinstance(key, int) and not isinstance(key, bool) for key in value):
        value = _id2label_names(value, "the id2label mapping of class names")  # a config's id2label, in id order
    # other mappings ({"cat": 0}, a label2id) would give their keys, b"cat,dog" its byte values
    if isinstance(value, (Mapping, bytes, bytearray)) or not isinstance(value, (str, Iterable)):
        hint = " (a mapping is taken as id2label: class id -> name)" if isinstance(value, Mapping) else ""
        raise ValueError(f"class names are a list of names or a string, got {type(value).__name__}: "
                         f"{str(value)[:60]}{hint}")
    if isinstance(value, str) and value.strip().startswith("["):  # an inline JSON list, as the scripts' help says
        value = _json_names(value, f"class names {value[:60]!r}")
    elif isinstance(value, str):
        path = Path(value).expanduser()
        # a name ending in .json or .txt is a file's (a missing labels.txt was one class named "labels.txt")
        if allow_files and (value.strip().lower().endswith((".json", ".txt", ".csv", ".tsv")) or _is_file(path)):
            if not path.is_file():
                raise ValueError(f"class-name file {value!r} not found.")
            text = _read_text_file(path, f"class-name file {value!r}")
            if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
                value = _json_names(text, f"class-name file {value!r}")
            elif path.suffix.lower() in (".csv", ".tsv"):
                value = _table_names(text, f"class-name table {value!r}")
            else:
                value = _one_per_line(text)
        elif len(value.strip().splitlines()) > 1:  # a file's text pasted or read by the caller: "car\nroad" was one
            value = _one_per_line(value)           # class named "car road" that took every pixel
        else:
            value = _separated(value)
    return validate_labels(list(value))


def _separated(text: str) -> list[str]:
    """Names separated by ";" (each may carry synonyms) or, without any ";", by "," (single names)."""
    separator = ";" if ";" in text else ","
    return [part for part in text.split(separator) if part.strip()]


def _one_per_line(text: str) -> list[str]:
    """One class per line (a line may carry synonyms: "sofa, couch"); a list wrapped over lines (a line but the
    last ending in "," or ";") is read as one line. Lines numbered in order ("0 road", "1: sidewalk", 0..N-1 or
    1..N, as label maps' id lists are written) lose their numbers: "0 road" was a class named so."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.endswith((",", ";")) for line in lines[:-1]):
        return _separated(" ".join(lines))
    numbered = [re.fullmatch(r"(\d+)\s*[:,.=\t ]\s*(\S.*)", line) for line in lines]
    if len(lines) > 1 and all(numbered) and _in_order([int(match[1]) for match in numbered]):
        return [match[2] for match in numbered]
    return lines


def _in_order(ids: list[int]) -> bool:
    return ids[0] in (0, 1) and ids == list(range(ids[0], ids[0] + len(ids)))


# the columns of class tables: names (ADE20K's objectInfo150.csv: Name; Roboflow's _classes.csv: Class) and ids
NAME_COLUMNS = ("name", "names", "class", "class name", "class_name", "classname", "label", "category")
ID_COLUMNS = ("id", "idx", "index", "pixel value", "class id", "class_id", "label id", "value")


def _table_names(text: str, where: str) -> list[str]:
    """The name column of a class table with a header row (.csv, .tsv), in row order: ADE20K's objectInfo150.csv
    ("Idx,Ratio,Train,Val,Name", synonyms as "building;edifice"), Roboflow's _classes.csv ("Pixel Value, Class"),
    "id,name" lists. Read line by line, its header was a class and every row a class with its numbers as synonyms.
    An id column must number the rows 0..N-1 or 1..N in order, or ids would get other classes' names."""
    import csv
    import io

    dialect = csv.excel_tab if "\t" in text.partition("\n")[0] else csv.excel
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text), dialect)
            if any(map(str.strip, row))]
    if not rows:
        raise ValueError(f"{where} is empty")
    header = [cell.lower() for cell in rows[0]]
    if len(header) == 1 and header[0] not in NAME_COLUMNS:  # one column, no header: a list of names
        return [row[0] for row in rows]
    column = next((header.index(name) for name in NAME_COLUMNS if name in header), None)
    if column is None:
        raise ValueError(f"{where} has no column of class names (its columns: {', '.join(rows[0])}); "
                         f"name it one of {', '.join(NAME_COLUMNS[:3])}, or give one class per line in a .txt")
    body = rows[1:]
    if any(len(row) <= column or not row[column] for row in body):
        raise ValueError(f"{where}: a row has no {rows[0][column]!r}")
    ids = next((header.index(name) for name in ID_COLUMNS if name in header), None)
    if ids is not None:
        try:
            numbers = [int(row[ids]) for row in body]
        except (ValueError, IndexError):
            raise ValueError(f"{where}: its {rows[0][ids]!r} column holds something other than class ids") from None
        if numbers and not _in_order(numbers):
            raise ValueError(f"{where} numbers its rows {numbers[:8]} in its {rows[0][ids]!r} column: they must "
                             "run from 0 or 1 in order, one row per class")
    return [", ".join(part for part in row[column].split(";") if part.strip()) for row in body]


def _json_names(text: str, where: str) -> list[str]:
    try:
        names = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not a JSON list of names: {error}") from None
    if isinstance(names, dict):  # an id2label.json, as Hub datasets and transformers' configs keep names
        names = _id2label_names(names, where)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where} must be a JSON list of names (strings), got {str(names)[:60]}")
    return names


def _id2label_names(mapping: dict, where: str) -> list:
    """{"0": "road", "1": "sidewalk", ...} -> the names in id order; the ids must be 0..N-1, each once."""
    try:
        by_id = {int(key): name for key, name in mapping.items()}
    except ValueError:
        raise ValueError(f"{where} maps keys that are no class ids: {list(mapping)[:5]}") from None
    if len(by_id) != len(mapping) or sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{where} maps the ids {sorted(by_id)[:8]}: class ids must run from 0 to N - 1, each once")
    return [by_id[index] for index in range(len(by_id))]


def _is_file(path: Path) -> bool:
    """False also for text no file can be named (a long list of names: 'File name too long', a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def validate_labels(labels: Sequence[str]) -> list[str]:
    """
    Reject an empty vocabulary and duplicated class names (which would make argmax ambiguous), and warn of a
    synonym two classes share. Names are compared and returned in one spelling (Unicode NFC, single spaces;
    synonyms joined by ", ").
    """
    if isinstance(labels, str):
        raise ValueError("Pass the vocabulary as a list of class names, not a single string.")
    synonyms = [split_synonyms(label) for label in labels]
    labels = [", ".join(names) for names in synonyms]
    if not labels:
        raise ValueError("The vocabulary is empty: give at least one class name.")
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        key = label.lower()
        if key in seen:
            raise ValueError(f"Duplicate class name {label!r} at positions {seen[key]} and {i}.")
        seen[key] = i
    owners: dict[str, int] = {}  # a synonym of two classes ("road" and "road, street") splits its pixels between them
    for i, (label, names) in enumerate(zip(labels, synonyms)):
        for synonym in dict.fromkeys(name.lower() for name in names):
            if synonym in owners:
                first = owners[synonym]
                warnings.warn(f"{synonym!r} names class {first} ({labels[first]!r}) and class {i} ({label!r}): "
                              "what it describes is split between the two; give each class its own names.",
                              stacklevel=1)  # one place: said once, though a pipeline call checks its labels twice
            owners.setdefault(synonym, i)
    return labels


def build_prompts(labels: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """All template x synonym prompts, and for each its (class index, synonym index)."""
    prompts, owners = [], []
    for class_index, label in enumerate(labels):
        for synonym_index, synonym in enumerate(split_synonyms(label)):
            for template in templates:
                prompts.append(template.format(synonym))
                owners.append((class_index, synonym_index))
    return prompts, owners


def pool_prompt_embeddings(embeds: torch.Tensor, owners: list[tuple[int, int]], num_classes: int) -> torch.Tensor:
    """Average normalised prompt embeddings over templates, then over synonyms; (T, E) -> (C, E), unit norm."""
    embeds = F.normalize(embeds.float(), dim=-1)
    synonym_keys = sorted(set(owners))
    key_index = {key: i for i, key in enumerate(synonym_keys)}
    index = torch.tensor([key_index[o] for o in owners], device=embeds.device)
    per_synonym = torch.zeros(len(synonym_keys), embeds.shape[-1], device=embeds.device).index_add_(0, index, embeds)
    per_synonym = F.normalize(per_synonym, dim=-1)
    class_index = torch.tensor([key[0] for key in synonym_keys], device=embeds.device)
    per_class = torch.zeros(num_classes, embeds.shape[-1], device=embeds.device).index_add_(0, class_index, per_synonym)
    return F.normalize(per_class, dim=-1)


def prompt_length_limit(tokenizer, max_length: int | None = None) -> int:
    """Tokens a prompt may keep: CLIP's context, the tokenizer's and the text tower's (`max_length`), the least."""
    model_max = getattr(tokenizer, "model_max_length", None) or CLIP_CONTEXT_LENGTH
    return min(CLIP_CONTEXT_LENGTH, model_max, max_length or CLIP_CONTEXT_LENGTH)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """The one tokenization of prompts: padded, truncated to `prompt_length_limit`."""
    tokens = tokenizer(list(prompts), padding=True, truncation=True,
                       max_length=prompt_length_limit(tokenizer, max_length), return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def check_distinct_after_truncation(rows: Sequence[tuple[int, ...]], labels: Sequence[str],
                                    owners: Sequence[tuple[int, int]], limit: int) -> None:
    """Two classes whose prompts tokenize identically (they differ only past the context) cannot be told apart.
    `rows` are the prompts' token ids without padding."""
    if all(len(row) < limit for row in rows):
        return  # nothing was truncated
    warnings.warn(f"Some class-name prompts are longer than {limit} tokens and were truncated.", stacklevel=3)
    per_class: dict[int, list[tuple]] = {}
    for row, (class_index, _) in zip(rows, owners):
        per_class.setdefault(class_index, []).append(row)
    seen: dict[tuple, int] = {}
    for class_index, class_rows in per_class.items():
        key = tuple(sorted(class_rows))
        if key in seen:
            raise ValueError(f"Class names {labels[seen[key]]!r} and {labels[class_index]!r} are identical within "
                             f"CLIP's {limit}-token context: shorten them so they differ early.")
        seen[key] = class_index


def embed_class_names(encode_text: Callable, labels: Sequence[str], tokenizer, templates: Sequence[str],
                      device, max_length: int | None = None, batch_size: int = 256) -> torch.Tensor:
    """(C, E) embeddings: every name (and synonym) in every prompt template, encoded, averaged and normalised."""
    labels = validate_labels(labels)
    prompts, owners = build_prompts(labels, templates)
    chunks, rows = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = tokenize_prompts(tokenizer, prompts[start : start + batch_size], max_length)
        rows += [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(chunk["input_ids"], chunk["attention_mask"])]
        chunks.append(chunk)
    check_distinct_after_truncation(rows, labels, owners, prompt_length_limit(tokenizer, max_length))
    embeds = [encode_text(c["input_ids"].to(device), c["attention_mask"].to(device)) for c in chunks]
    return pool_prompt_embeddings(torch.cat(embeds), owners, len(labels))


class MROVSegOpenVocabClassifier(nn.Module):
    """Cosine similarity x CLIP's logit scale against the class text embeddings, plus a learned no-object class."""

    def __init__(self, projection_dim: int):
        super().__init__()
        self.no_object_embedding = nn.Parameter(torch.zeros(projection_dim))

    def forward(self, query_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """query_embeds (B, N, E) unit norm, text_embeds (C, E) or (B, C, E) -> (B, N, C + 1) logits."""
        if text_embeds.dim() == 2:
            text_embeds = text_embeds[None].expand(query_embeds.shape[0], -1, -1)
        no_object = F.normalize(self.no_object_embedding, dim=-1)
        classes = torch.cat([F.normalize(text_embeds, dim=-1), no_object.expand(text_embeds.shape[0], 1, -1)], dim=1)
        return logit_scale.exp().clamp(max=100) * torch.einsum("bnp,bcp->bnc", query_embeds, classes.to(query_embeds.dtype))
