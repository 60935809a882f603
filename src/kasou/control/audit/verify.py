"""Verification of the audit chain: the records in order, the checkpoints in the store and those anchored
outside it, and a checkpoint at every multiple of the interval (pure: the caller reads the store)."""

from __future__ import annotations

from typing import Any

from kasou.control.audit import anchors, keys
from kasou.control.audit.records import (
    CHECKPOINT_PREFIX,
    GENESIS,
    PREFIX,
    SEQ_DIGITS,
    Checkpoint,
    Problem,
    VerifyReport,
    digest,
)


def _key_seq(key: str, prefix: str) -> int | None:
    rest = key[len(prefix) :]
    return int(rest) if rest.isdigit() and len(rest) == SEQ_DIGITS else None


def verify_entries(
    records: list[tuple[str, dict[str, Any]]],
    checkpoints: list[tuple[str, dict[str, Any]]],
    trusted: dict[str, Any],
    anchored: list[anchors.Anchor] | None = None,
    anchor_file: str | None = None,
    every: int | None = None,
) -> VerifyReport:
    """Walk the chain (records in key order), the checkpoints in the store, the checkpoints ``anchored``
    outside it (None: no anchor file) and, with ``every`` (the verifier's interval, used until a checkpoint
    declares one), a checkpoint at every multiple of the interval; the first problem, by sequence number."""
    problem: Problem | None = None
    prev, expected = GENESIS, 1
    hashes: dict[int, str] = {}
    last_seq: int | None = None
    for key, v in records:
        seq = _key_seq(key, PREFIX)
        if seq is None:
            problem = Problem(kind="malformed", seq=expected, message=f"a key {key!r} that is no record's")
            break
        if seq != expected:
            gone = f"record {expected}" if seq == expected + 1 else f"records {expected} to {seq - 1}"
            problem = Problem(kind="deleted", seq=expected, message=f"{gone} missing: the log goes on at {seq}")
            break
        if v.get("seq") != seq:
            problem = Problem(
                kind="reordered",
                seq=seq,
                message=f"the record stored as {seq} says it is record {v.get('seq')}: records were moved",
            )
            break
        try:
            h = digest(v)
        except (TypeError, ValueError) as e:
            problem = Problem(kind="malformed", seq=seq, message=f"record {seq} cannot be hashed: {e}")
            break
        if h != v.get("hash"):
            problem = Problem(
                kind="edited",
                seq=seq,
                message=f"record {seq} was changed after it was written: its content does not match its hash",
            )
            break
        if v.get("prev_hash") != prev:
            problem = Problem(
                kind="reordered",
                seq=seq,
                message=f"record {seq} does not follow record {seq - 1} (prev_hash mismatch): records "
                f"were reordered or replaced, or record {seq - 1} was rewritten with a new hash",
            )
            break
        prev, hashes[seq], last_seq, expected = h, h, seq, seq + 1
    checked_upto = problem.seq if problem is not None else None
    found: list[Problem] = [problem] if problem is not None else []
    declared: dict[int, int] = {}  # seq -> the interval a valid checkpoint declares from there on
    stored: set[int] = set()
    last_cp: int | None = None
    ends = f"ends at {last_seq}" if last_seq else "is empty"

    def against_log(cp: Checkpoint, said: str, named: str) -> Problem | None:
        """A checkpoint (from the store or an anchor) past the log's end, or not matching its record."""
        if last_seq is None or cp.seq > last_seq:
            return Problem(
                kind="truncated", seq=(last_seq or 0) + 1,
                message=f"checkpoint {cp.seq} {said} but the log {ends}: records "
                f"{(last_seq or 0) + 1} to {cp.seq} were deleted",
            )  # fmt: skip
        if hashes.get(cp.seq) != cp.hash:
            return Problem(
                kind="checkpoint_mismatch", seq=cp.seq,
                message=f"record {cp.seq} does not match {named}: the log up to {cp.seq} was rewritten",
            )  # fmt: skip
        return None

    def signed(cp: Checkpoint, where: str) -> Problem | None:
        pub = trusted.get(cp.key_id)
        if pub is None:
            return Problem(kind="unknown_key", seq=cp.seq, message=f"{where} is signed by key {cp.key_id} "
                           f"(host {cp.host}), which this verifier does not trust")  # fmt: skip
        if not keys.check(pub, cp.seq, cp.hash, cp.signature, cp.every):
            forged = f"{where}'s signature is not valid: the checkpoint was forged or changed"
            return Problem(kind="bad_signature", seq=cp.seq, message=forged)
        if cp.every is not None and cp.every >= 1:
            declared[cp.seq] = cp.every
        return None

    for key, v in checkpoints:
        seq = _key_seq(key, CHECKPOINT_PREFIX)
        try:
            cp = Checkpoint.model_validate(v)
        except ValueError:
            cp = None
        if seq is None or cp is None or cp.seq != seq:
            found.append(Problem(kind="malformed", seq=seq or 0, message=f"the checkpoint {key!r} is malformed"))
            break
        bad = signed(cp, f"checkpoint {seq}")
        if bad is not None:
            found.append(bad)
            break
        last_cp = seq
        stored.add(seq)
        if checked_upto is not None and seq >= checked_upto:
            continue  # the chain is already broken before it: that is the problem to report
        wrong = against_log(cp, f"seals records up to {seq}", f"the signed checkpoint {seq}")
        if wrong is not None:
            found.append(wrong)
            break
    last_anchor: int | None = None
    for a in anchored or []:
        where = f"line {a.line} of the anchor file {anchor_file}"
        try:
            cp = Checkpoint.model_validate(a.value) if a.value is not None else None
        except ValueError:
            cp = None
        if cp is None:
            found.append(Problem(kind="malformed", seq=0, message=f"{where} is not a checkpoint"))
            break
        bad = signed(cp, f"the checkpoint {cp.seq} at {where}")
        if bad is not None:
            found.append(bad)
            break
        last_anchor = max(cp.seq, last_anchor or 0)
        if checked_upto is not None and cp.seq >= checked_upto:
            continue
        wrong = against_log(cp, f"is anchored at {where}", f"the checkpoint {cp.seq} anchored at {where}")
        if wrong is not None:
            found.append(wrong)
            break
        if cp.seq not in stored:
            found.append(Problem(
                kind="checkpoint_missing", seq=cp.seq,
                message=f"checkpoint {cp.seq} is anchored at {where} but missing from the store: "
                "checkpoints were deleted",
            ))  # fmt: skip
            break
    limit = (checked_upto - 1) if checked_upto is not None else (last_seq or 0)
    missing = _missing_checkpoint(limit, stored, declared, every)
    if missing is not None:
        seq, n = missing
        found.append(Problem(
            kind="checkpoint_missing", seq=seq,
            message=f"no signed checkpoint at record {seq}, although one is written every {n} records: "
            f"checkpoints were deleted from the store (or its writer stopped between the record and its checkpoint)",
        ))  # fmt: skip
    problem = min(found, key=lambda p: p.seq) if found else None  # the first by seq; on a tie the first found
    first = _key_seq(records[0][0], PREFIX) if records else None
    sealed = max(last_cp or 0, last_anchor or 0)
    return VerifyReport(
        ok=problem is None,
        records=len(records),
        first_seq=first,
        last_seq=_key_seq(records[-1][0], PREFIX) if records else None,
        head_hash=str(records[-1][1].get("hash")) if records else None,
        checkpoints=len(checkpoints),
        last_checkpoint=last_cp,
        unsealed=(last_seq or 0) - sealed if problem is None else 0,
        problem=problem,
        anchor_file=anchor_file,
        anchors=len(anchored or []),
        last_anchor=last_anchor,
    )


def _missing_checkpoint(
    limit: int, stored: set[int], declared: dict[int, int], every: int | None
) -> tuple[int, int] | None:
    """The first multiple of the interval up to record ``limit`` without a checkpoint in the store, and that
    interval. The interval of a stretch is the one its last preceding checkpoint declared; before the first
    one, the first declared; with none declared, ``every`` (None: no such check)."""
    points = sorted(declared.items())
    n = points[0][1] if points else every
    if n is None:
        return None
    lo = 0
    for at, nxt in [*points, (limit, n)]:
        hi = min(at, limit)
        m = (lo // n + 1) * n
        while m <= hi:
            if m not in stored:
                return m, n
            m += n
        if at >= limit:
            return None
        lo, n = at, nxt
    return None
