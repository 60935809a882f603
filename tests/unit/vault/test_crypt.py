"""Backup keys, paper keys and sealed chunks (kasou.vault.crypt)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kasou.errors import AlreadyExists, BackupCorrupt, InvalidSpec
from kasou.vault.crypt import CHUNK_SIZE, MAGIC, BackupKey, PublicBackupKey, chunk_id, seal, unseal


@pytest.fixture(scope="module")
def key() -> BackupKey:
    return BackupKey.generate()


def test_seal_unseal_round_trip(key: BackupKey) -> None:
    pub = key.public()
    for data in (b"", b"hello", os.urandom(100_000), bytes(1000) + b"x" * 5000):
        cid = chunk_id(pub, data)
        blob = seal(pub, data)
        assert blob.startswith(MAGIC) and len(cid) == 64
        assert unseal(key, cid, blob) == data


def test_layout_and_compression(key: BackupKey) -> None:
    pub = key.public()
    data = b"kasou " * 100_000
    blob = seal(pub, data)
    assert len(blob) < len(data) // 50  # zstd ran first
    assert len(seal(pub, data)) == len(blob) and seal(pub, data) != blob  # a fresh ephemeral key and nonce each time
    assert blob[4:36] != blob[36 + 12 : 36 + 12 + 32]


def test_ids_are_keyed(key: BackupKey) -> None:
    other = BackupKey.generate()
    assert chunk_id(key, b"x") == chunk_id(key.public(), b"x")
    assert chunk_id(key, b"x") != chunk_id(other, b"x")


@pytest.mark.parametrize("where", [0, 3, 4, 20, 40, 47, 48, 60, -1])
def test_a_changed_byte_is_refused(key: BackupKey, where: int) -> None:
    data = os.urandom(3000)
    cid = chunk_id(key, data)
    blob = bytearray(seal(key.public(), data))
    blob[where] ^= 0x01
    with pytest.raises(BackupCorrupt):
        unseal(key, cid, bytes(blob))


def test_truncated_and_garbage_blobs_are_refused(key: BackupKey) -> None:
    data = b"abc" * 100
    cid = chunk_id(key, data)
    blob = seal(key.public(), data)
    for bad in (blob[:-1], blob[:50], b"", b"KSC1", b"XXXX" + blob[4:]):
        with pytest.raises(BackupCorrupt):
            unseal(key, cid, bad)


def test_wrong_key_is_refused(key: BackupKey) -> None:
    data = b"secret record"
    blob = seal(key.public(), data)
    with pytest.raises(BackupCorrupt, match="does not decrypt"):
        unseal(BackupKey.generate(), chunk_id(key, data), blob)


def test_a_blob_under_another_id_is_refused(key: BackupKey) -> None:
    """The id is the AEAD's associated data: a blob stored under another chunk's id does not open."""
    a, b = b"chunk a", b"chunk b"
    with pytest.raises(BackupCorrupt):
        unseal(key, chunk_id(key, b), seal(key.public(), a))


def test_a_blob_that_decrypts_to_other_content_is_refused(key: BackupKey) -> None:
    """A writer holding the public key can seal anything under any id: the HMAC check catches it."""
    with pytest.raises(BackupCorrupt, match="other content"):
        unseal(key, chunk_id(key, b"the real one"), seal(key.public(), b"forged", cid=chunk_id(key, b"the real one")))


def test_plaintext_over_a_chunk_is_refused(key: BackupKey) -> None:
    with pytest.raises(InvalidSpec):
        seal(key.public(), bytes(CHUNK_SIZE + 1))


def test_a_frame_claiming_a_huge_size_is_refused(key: BackupKey) -> None:
    """A decompression bomb sealed by someone holding the public key is refused by its stated size."""
    packed = zstandard.ZstdCompressor(level=3).compress(bytes(CHUNK_SIZE + 10))
    cid = "0" * 64
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    recipient = key.public().public_raw
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient, info=b"kasou-chunk-v1")
    aead_key = hkdf.derive(eph.exchange(key.public().public_key))
    blob = MAGIC + eph_pub + bytes(12) + AESGCM(aead_key).encrypt(bytes(12), packed, cid.encode())
    with pytest.raises(BackupCorrupt, match="size"):
        unseal(key, cid, blob)


def test_fingerprint(key: BackupKey) -> None:
    assert len(key.fingerprint) == 16 and int(key.fingerprint, 16) >= 0
    assert key.fingerprint == key.public().fingerprint
    assert key.private_raw.hex() not in repr(key) and key.id_secret.hex() not in repr(key.public())


def test_paper_round_trip(key: BackupKey) -> None:
    paper = key.paper()
    assert paper.startswith("KASOU-BK1-")
    groups = paper.removeprefix("KASOU-BK1-").split("-")
    assert len(groups) == 27 and all(len(g) == 4 for g in groups[:25]) and len(groups[-1]) == 4
    again = BackupKey.from_paper(paper)
    assert again.private_raw == key.private_raw and again.id_secret == key.id_secret
    # As typed from the paper: lower case, spaces, lines.
    typed = "kasou-bk1-\n" + "\n".join(" ".join(groups[i : i + 6]).lower() for i in range(0, 27, 6))
    assert BackupKey.from_paper(typed).fingerprint == key.fingerprint


def _mistype(paper: str, group: int, pos: int = 1) -> str:
    groups = paper.removeprefix("KASOU-BK1-").split("-")
    g = groups[group - 1]
    groups[group - 1] = g[:pos] + ("A" if g[pos] != "A" else "B") + g[pos + 1 :]
    return "KASOU-BK1-" + "-".join(groups)


# A fixed key: the group is named only when exactly one single change makes the key valid again, and with a
# random key about 1 in 300 mistypes has a second such change elsewhere (a 20-bit checksum against ~3,300
# candidates); then the message says "a group is mistyped" without naming one, as the next test checks.
FIXED_KEY = BackupKey(X25519PrivateKey.from_private_bytes(bytes(range(32))), bytes(range(32, 64)))


@pytest.mark.parametrize("group", [1, 9, 26, 27])
def test_a_mistyped_group_is_refused_and_named(group: int) -> None:
    with pytest.raises(InvalidSpec, match=f"group {group} ") as e:
        BackupKey.from_paper(_mistype(FIXED_KEY.paper(), group))
    assert "\n" not in e.value.message


def test_a_mistype_with_two_possible_corrections_names_no_group(key: BackupKey) -> None:
    """Whatever the key, a mistype is refused in one line, naming a group or saying to check them all."""
    for group in range(1, 28):
        with pytest.raises(InvalidSpec, match=r"mistyped: check (it|each group) against the paper") as e:
            BackupKey.from_paper(_mistype(key.paper(), group))
        assert "\n" not in e.value.message


def test_swapped_characters_are_refused(key: BackupKey) -> None:
    paper = key.paper()
    i = paper.index("-", 12) + 1  # the start of group 2
    while paper[i] == paper[i + 1]:
        i += 5
    swapped = paper[:i] + paper[i + 1] + paper[i] + paper[i + 2 :]
    with pytest.raises(InvalidSpec, match="mistyped"):
        BackupKey.from_paper(swapped)


def test_other_bad_paper_keys(key: BackupKey) -> None:
    paper = key.paper()
    with pytest.raises(InvalidSpec, match="starts with"):
        BackupKey.from_paper(paper.replace("BK1", "BK2"))
    with pytest.raises(InvalidSpec, match="missing"):
        BackupKey.from_paper(paper[:-1])
    with pytest.raises(InvalidSpec, match="too many"):
        BackupKey.from_paper(paper + "A")
    with pytest.raises(InvalidSpec, match=r"group 3 .*not a base32 letter.*0 is O"):
        BackupKey.from_paper(paper[:20] + "0" + paper[21:])


def test_key_files(tmp_path: Path, key: BackupKey) -> None:
    path = tmp_path / "backup.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert BackupKey.load(path).private_raw == key.private_raw
    with pytest.raises(AlreadyExists):
        key.save(path)
    assert list(tmp_path.iterdir()) == [path]
    pub_path = tmp_path / "backup.pub"
    key.public().save(pub_path)
    loaded = PublicBackupKey.load(pub_path)
    assert loaded.fingerprint == key.fingerprint and loaded.id_secret == key.id_secret
    assert "private_key" not in pub_path.read_text()
    with pytest.raises(InvalidSpec, match="not a kasou-backup-key"):
        BackupKey.load(pub_path)


def test_damaged_key_files_are_refused(key: BackupKey) -> None:
    data = json.loads(key.to_json())
    with pytest.raises(InvalidSpec, match="damaged"):
        BackupKey.from_json({**data, "fingerprint": "0" * 16})
    with pytest.raises(InvalidSpec, match="32"):
        BackupKey.from_json({**data, "id_secret": "abcd"})
    with pytest.raises(InvalidSpec, match="JSON"):
        BackupKey.from_json("{nope")
    with pytest.raises(InvalidSpec, match="no key file"):
        BackupKey.load("/nonexistent/backup.key")
