"""Edit datasets -> one polars schema of edit records.

Formats: ZsRE (MEND fields), CounterFact (ROME format), CounterFact flattened (EasyEdit), and a
plain user format (JSONL or CSV). Every bad record gets an error naming file, record and field;
with ``skip_bad=True`` bad records are skipped and counted instead.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import polars as pl

from memoe.registry import Registry

SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String,
    "subject": pl.String,
    "prompt": pl.String,
    "target_new": pl.String,
    "target_true": pl.String,
    "relation": pl.String,
    "rephrase_prompts": pl.List(pl.String),
    "locality_prompts": pl.List(pl.String),
    "locality_answers": pl.List(pl.String),
    "portability_prompts": pl.List(pl.String),
    "portability_answers": pl.List(pl.String),
    "generation_prompts": pl.List(pl.String),
}
LIST_FIELDS = [k for k, v in SCHEMA.items() if isinstance(v, pl.List)]


class EditDataError(ValueError):
    """A data file or record is invalid. The message names the file, the record and the field."""

    def __init__(self, path: str | Path, message: str, record: Any = None, field: str | None = None):
        where = str(path)
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.record, self.field = str(path), record, field


@dataclass
class LoadReport:
    path: str
    format: str
    n_read: int = 0
    n_kept: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _norm(text: str) -> str:
    return re.sub(r"[^\w]+", " ", text.lower()).strip()


def _req_str(rec: dict, key: str, path, rid) -> str:
    if key not in rec or rec[key] is None:
        raise EditDataError(path, "missing field", rid, key)
    v = rec[key]
    if not isinstance(v, str):
        raise EditDataError(path, f"expected a string, got {type(v).__name__}", rid, key)
    if not v.strip():
        raise EditDataError(path, "empty value", rid, key)
    return v


def _opt_str(rec: dict, key: str, path, rid) -> str | None:
    """An optional string field: absent, null or empty -> None; anything but a string is an error."""
    v = rec.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise EditDataError(path, f"expected a string, got {type(v).__name__}", rid, key)
    return v


def _opt_list(rec: dict, key: str, path, rid) -> list[str]:
    v = rec.get(key)
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise EditDataError(path, "expected a string or a list of strings", rid, key)
    return list(v)


def _get(rec: dict, dotted: str, path, rid) -> Any:
    node: Any = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise EditDataError(path, "missing field", rid, dotted)
        node = node[part]
    return node


def _str_at(rec: dict, dotted: str, path, rid) -> str:
    v = _get(rec, dotted, path, rid)
    if not isinstance(v, str):
        raise EditDataError(path, f"expected a string, got {type(v).__name__}", rid, dotted)
    if not v.strip():
        raise EditDataError(path, "empty value", rid, dotted)
    return v


def _portability(rec: dict, path, rid) -> tuple[list[str], list[str]]:
    p = rec.get("portability")
    if not p:
        return [], []
    if not isinstance(p, dict):
        raise EditDataError(path, "expected a mapping", rid, "portability")
    q, a = p.get("New Question"), p.get("New Answer")
    if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
        return [], []
    return [q], [a]


def edit_record(
    id,
    subject: str,
    prompt: str,
    target_new: str,
    target_true: str | None = None,
    *,
    relation: str | None = None,
    rephrase_prompts=(),
    locality_prompts=(),
    locality_answers=(),
    portability_prompts=(),
    portability_answers=(),
    generation_prompts=(),
) -> dict:
    """One edit as a parser returns it (the columns of ``SCHEMA``; the prompt lists default to none)."""
    return dict(
        id=str(id),
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        target_true=target_true,
        relation=relation,
        rephrase_prompts=list(rephrase_prompts),
        locality_prompts=list(locality_prompts),
        locality_answers=list(locality_answers),
        portability_prompts=list(portability_prompts),
        portability_answers=list(portability_answers),
        generation_prompts=list(generation_prompts),
    )


def _zsre(rec: dict, path, rid) -> dict:
    answers = rec.get("answers")
    if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
        raise EditDataError(path, f"expected a list of strings, got {answers!r}", rid, "answers")
    target_true = answers[0] if answers else None
    pp, pa = _portability(rec, path, rid)
    return edit_record(
        rec.get("case_id", rid),
        _req_str(rec, "subject", path, rid),
        _req_str(rec, "src", path, rid),
        _req_str(rec, "alt", path, rid),
        target_true,
        rephrase_prompts=_opt_list(rec, "rephrase", path, rid),
        locality_prompts=_opt_list(rec, "loc", path, rid),
        locality_answers=_opt_list(rec, "loc_ans", path, rid),
        portability_prompts=pp,
        portability_answers=pa,
    )


def _counterfact(rec: dict, path, rid) -> dict:
    rw = _get(rec, "requested_rewrite", path, rid)
    if not isinstance(rw, dict):
        raise EditDataError(path, "expected a mapping", rid, "requested_rewrite")
    subject = _str_at(rec, "requested_rewrite.subject", path, rid)
    template = _str_at(rec, "requested_rewrite.prompt", path, rid)
    if template.count("{}") != 1:
        raise EditDataError(
            path,
            f"prompt template has {template.count('{}')} '{{}}' placeholders; expected exactly one, for the subject",
            rid,
            "requested_rewrite.prompt",
        )
    target_true = _str_at(rec, "requested_rewrite.target_true.str", path, rid)
    neigh = _opt_list(rec, "neighborhood_prompts", path, rid)
    pp, pa = _portability(rec, path, rid)
    return edit_record(
        rec.get("case_id", rid),
        subject,
        template.replace("{}", subject),
        _str_at(rec, "requested_rewrite.target_new.str", path, rid),
        target_true,
        relation=_opt_str(rw, "relation_id", path, rid),
        rephrase_prompts=_opt_list(rec, "paraphrase_prompts", path, rid),
        locality_prompts=neigh,
        locality_answers=[target_true] * len(neigh),
        portability_prompts=pp,
        portability_answers=pa,
        generation_prompts=_opt_list(rec, "generation_prompts", path, rid),
    )


def _counterfact_flat(rec: dict, path, rid) -> dict:
    return edit_record(
        rec.get("case_id", rid),
        _req_str(rec, "subject", path, rid),
        _req_str(rec, "prompt", path, rid),
        _req_str(rec, "target_new", path, rid),
        _opt_str(rec, "ground_truth", path, rid),
        rephrase_prompts=_opt_list(rec, "rephrase_prompt", path, rid),
        locality_prompts=_opt_list(rec, "locality_prompt", path, rid),
        locality_answers=_opt_list(rec, "locality_ground_truth", path, rid),
    )


def _user(rec: dict, path, rid) -> dict:
    def lst(key: str) -> list[str]:
        v = rec.get(key)
        if isinstance(v, str) and v.strip().startswith("["):  # CSV cells may hold JSON lists
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise EditDataError(path, "malformed JSON list", rid, key) from None
        elif isinstance(v, str) and "|" in v:
            v = [s.strip() for s in v.split("|")]
        return _opt_list({key: v}, key, path, rid)

    return edit_record(
        rec.get("id") or rid,
        _req_str(rec, "subject", path, rid),
        _req_str(rec, "prompt", path, rid),
        _req_str(rec, "target_new", path, rid),
        _opt_str(rec, "target_true", path, rid),
        relation=_opt_str(rec, "relation", path, rid),
        rephrase_prompts=lst("rephrases") or lst("rephrase_prompts"),
        locality_prompts=lst("locality_prompts"),
        locality_answers=lst("locality_answers"),
        portability_prompts=lst("portability_prompts"),
        portability_answers=lst("portability_answers"),
        generation_prompts=lst("generation_prompts"),
    )


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped; other bytes are an error naming
    the file and the place."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EditDataError(path, f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def read_json_list(path: Path, text: str) -> Iterable[tuple[Any, Any]]:
    """A JSON list of records: (position, record)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EditDataError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise EditDataError(path, f"expected a JSON list of records, got {type(data).__name__}")
    yield from enumerate(data)


def read_jsonl(path: Path, text: str) -> Iterable[tuple[Any, Any]]:
    """One JSON object a line, split on newline characters only (a U+2028 or U+0085 inside a string
    is data, not a line break); a malformed line is yielded as its EditDataError."""
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {i}", EditDataError(path, f"malformed JSON: {e.msg} (column {e.colno})", f"line {i}")


def read_csv(path: Path, text: str) -> Iterable[tuple[Any, Any]]:
    """CSV with a header, parsed by the csv module on the text as it is (quoted cells keep their
    newlines; the record number is the line its row starts on); empty cells are None."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames:
            raise EditDataError(path, "empty CSV file (no header)")
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            if None in row:
                yield f"line {start}", EditDataError(path, "more cells than header columns", f"line {start}")
            else:
                yield f"line {start}", {k: (v if v != "" else None) for k, v in row.items()}
    except csv.Error as e:
        raise EditDataError(path, f"malformed CSV at line {reader.line_num}: {e}") from None


@dataclass(frozen=True)
class Format:
    """A data format: ``parse(rec, path, rid) -> dict`` turns one raw record into the edit fields;
    ``read(path, text)`` yields (record number, raw record) from the file's text."""

    parse: Callable[[dict, Any, Any], dict]
    read: Callable[[Path, str], Iterable[tuple[Any, Any]]] = read_json_list


FORMATS: Registry = Registry("data format")


def register_format(
    name: str,
    parser: Callable[[dict, Any, Any], dict],
    reader: Callable[[Path, str], Iterable[tuple[Any, Any]]] = read_json_list,
) -> None:
    """Register a data format: ``data.format`` and ``load_edits`` then accept ``name``."""
    FORMATS[name] = Format(parser, reader)


register_format("zsre", _zsre)
register_format("counterfact", _counterfact)
register_format("counterfact-flat", _counterfact_flat)
register_format("jsonl", _user, read_jsonl)
register_format("csv", _user, read_csv)


def _read_records(path: Path, fmt: str) -> Iterable[tuple[Any, Any]]:
    """Yield (record number, raw record). Malformed files raise EditDataError naming the place."""
    if not path.is_file():
        raise EditDataError(path, "file not found")
    yield from FORMATS[fmt].read(path, _read_text(path))


def _validate(row: dict, path, rid, max_prompt_tokens: int | None, count_tokens) -> None:
    if not _norm(row["subject"]):
        raise EditDataError(path, f"subject {row['subject']!r} has no letters or digits", rid, "subject")
    # whole words only: 'corp' does not occur in "Widget Corporation"
    if f" {_norm(row['subject'])} " not in f" {_norm(row['prompt'])} ":
        raise EditDataError(
            path, f"subject {row['subject']!r} does not occur in the prompt {row['prompt']!r}", rid, "subject"
        )
    if len(row["locality_prompts"]) != len(row["locality_answers"]):
        raise EditDataError(
            path,
            f"{len(row['locality_prompts'])} locality prompts but {len(row['locality_answers'])} answers",
            rid,
            "locality_answers",
        )
    for k in LIST_FIELDS:
        for j, s in enumerate(row[k]):
            if not s.strip():
                raise EditDataError(path, f"empty string at position {j}", rid, k)
    if max_prompt_tokens and count_tokens is not None:
        for k in ("prompt", "rephrase_prompts", "locality_prompts", "portability_prompts"):
            texts = [row[k]] if isinstance(row[k], str) else row[k]
            for t in texts:
                n = count_tokens(t + " " + row["target_new"])
                if n > max_prompt_tokens:
                    raise EditDataError(
                        path, f"prompt of {n} tokens exceeds the model's context of {max_prompt_tokens}", rid, k
                    )


def load_edits(
    path: str | Path,
    fmt: str,
    *,
    skip_bad: bool = False,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[pl.DataFrame, LoadReport]:
    """Load a data file into the edit-record schema. Returns (frame, report)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise EditDataError(path, f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    parse = FORMATS[fmt].parse
    report = LoadReport(path=str(path), format=fmt)
    rows: list[dict] = []
    seen: dict[str, Any] = {}
    for rid, rec in _read_records(path, fmt):
        report.n_read += 1
        try:
            if isinstance(rec, EditDataError):
                raise rec
            if not isinstance(rec, dict):
                raise EditDataError(path, f"expected a JSON object, got {type(rec).__name__}", rid)
            row = parse(rec, path, rid)
            _validate(row, path, rid, max_prompt_tokens, count_tokens)
            if row["id"] in seen:
                raise EditDataError(path, f"duplicate id {row['id']!r} (first at record {seen[row['id']]})", rid, "id")
        except EditDataError as e:
            if not skip_bad:
                raise
            report.skipped.append(str(e))
            continue
        seen[row["id"]] = rid
        rows.append(row)
    if not rows:
        raise EditDataError(path, "no valid records" + (f" ({report.n_skipped} skipped)" if report.n_skipped else ""))
    report.n_kept = len(rows)
    return pl.DataFrame(rows, schema=SCHEMA), report


def sample_edits(df: pl.DataFrame, n: int | None, seed: int = 0, how: str = "first") -> pl.DataFrame:
    """Deterministic sample of n records: the first n, or a seeded random sample (stable order)."""
    if n is None or n >= df.height:
        return df
    if how == "first":
        return df.head(n)
    return df.sample(n=n, seed=seed, shuffle=True)


RE_EDIT = "#re"  # an id with this suffix: a re-edit of the record whose id precedes it


def split_rounds(
    df: pl.DataFrame, rounds: int, batch_size: int, re_edit: tuple[int, int] | None = None, seed: int = 0
) -> list[pl.DataFrame]:
    """Split edits into ``rounds`` consecutive batches of ``batch_size`` (the sequential protocol).
    ``re_edit=(r, q)`` (1-based rounds, q < r): round r re-edits round q's edits instead of taking new
    ones (``re_edits``), so the study needs (rounds - 1) x batch_size edits."""
    unique = rounds - (1 if re_edit else 0)
    need = unique * batch_size
    if need > df.height:
        raise ValueError(f"{unique} rounds x {batch_size} edits = {need} edits, but only {df.height} available")
    parts = [df.slice(t * batch_size, batch_size) for t in range(unique)]
    if re_edit:
        r, q = re_edit
        if not 1 <= q < r <= rounds:
            raise ValueError(
                f"protocol.re_edit: round {r} cannot re-edit round {q} of a {rounds}-round study "
                "(need 1 <= of_round < round <= rounds)"
            )
        parts.insert(r - 1, re_edits(parts[q - 1], r, seed))
    return parts


def re_edits(part: pl.DataFrame, round_no: int, seed: int = 0) -> pl.DataFrame:
    """The same edits again with new targets: each record takes another record's ``target_new`` (a
    seeded derangement over the distinct targets, so no record keeps its own); its earlier target
    becomes ``target_true`` (what the edited model said before), its id gets ``#re<round>``."""
    import random

    old = part["target_new"].to_list()
    if len(set(old)) < 2:
        raise ValueError("protocol.re_edit: the re-edited round needs at least two distinct targets")
    order = list(range(len(old)))
    rng = random.Random(seed * 1000 + round_no)
    while True:  # a derangement of the targets (a few tries at most)
        rng.shuffle(order)
        new = [old[j] for j in order]
        if all(a != b for a, b in zip(new, old)):
            break
    return part.with_columns(
        pl.Series("target_new", new, pl.String),
        pl.Series("target_true", old, pl.String),
        (pl.col("id") + f"{RE_EDIT}{round_no}").alias("id"),
    )


def frame_hash(df: pl.DataFrame) -> str:
    """Content hash of an edit frame (row order matters)."""
    h = hashlib.sha256()
    for row in df.iter_rows():
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


REQUIRED = ("subject", "prompt", "target_new")


def validate_frame(df: Any, where: str = "edit records") -> pl.DataFrame:
    """Check a frame of edit records as the loaders check a file, and return it in ``SCHEMA``
    (``id`` from the row number and the optional columns empty where absent). Every editor's
    ``edit()`` calls it (``Editor`` in memoe/editors/base.py), so a frame built by hand gets the
    same clear errors (naming the record and the column) as a data file."""
    if not isinstance(df, pl.DataFrame):
        raise EditDataError(where, f"expected a polars DataFrame of edit records, got {type(df).__name__}")
    unknown = [c for c in df.columns if c not in SCHEMA]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise EditDataError(
            where,
            f"missing column(s) {', '.join(repr(c) for c in missing)} (required: "
            f"{', '.join(REQUIRED)}; optional: {', '.join(c for c in SCHEMA if c not in REQUIRED)})"
            + (f"; unknown column(s): {', '.join(unknown)}" if unknown else ""),
            field=missing[0],
        )
    if df.height == 0:
        raise EditDataError(where, "no edit records")
    ids = df["id"].cast(pl.String).to_list() if "id" in df.columns else [str(i) for i in range(df.height)]
    rows, seen = [], {}
    for i, rec in enumerate(df.drop([c for c in ("id",) if c in df.columns]).iter_rows(named=True)):
        rid = ids[i] if ids[i] is not None else str(i)
        row = {"id": rid, "target_true": rec.get("target_true"), "relation": rec.get("relation")}
        for k in REQUIRED:
            row[k] = _req_str(rec, k, where, rid)
        if row["target_true"] is not None and not isinstance(row["target_true"], str):
            raise EditDataError(
                where, f"expected a string, got {type(row['target_true']).__name__}", rid, "target_true"
            )
        if row["relation"] is not None and not isinstance(row["relation"], str):
            raise EditDataError(where, f"expected a string, got {type(row['relation']).__name__}", rid, "relation")
        for k in LIST_FIELDS:
            row[k] = _opt_list(rec, k, where, rid)
        _validate(row, where, rid, None, None)
        if rid in seen:
            raise EditDataError(where, f"duplicate id {rid!r} (first at row {seen[rid]})", rid, "id")
        seen[rid] = i
        rows.append(row)
    return pl.DataFrame(rows, schema=SCHEMA)


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + target, and the number of prompt tokens: an edit as the editors train
    on it and the metrics score it (one tokenisation for both)."""
    p = tokenizer(prompt, add_special_tokens=True).input_ids
    t = tokenizer(" " + target.strip(), add_special_tokens=False).input_ids
    if not t:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return p + t, len(p)
