#!/usr/bin/env python3
"""An independent reader of vsnap's encrypted formats, written from
docs/repository.md ("Encryption at rest") alone, with PyPI's
`cryptography` and `blake3`: none of vsnap's code.

    vsnap_reader.py slot SLOT.json (--passphrase-file F | --key-file F)
        prints the master key the slot wraps, hex
    vsnap_reader.py open MASTER_HEX KIND PLACE SEALED_FILE
        prints the plaintext of a sealed blob, hex
    vsnap_reader.py id MASTER_HEX FILE
        prints the chunk id of FILE's bytes, hex
"""
import json
import struct
import sys

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

KEY_FILE_CONTEXT = "vsnap 2026-12-08 key file slot"
ID_CONTEXT = "vsnap 2026-12-08 chunk id"
SEAL_CONTEXT = "vsnap 2026-12-08 blob seal"
WRAP_AAD = b"vsnap key slot 1 "
KINDS = {"chunk": 1, "index": 2, "manifest": 3, "pack-index": 4, "lease": 5, "list": 6}


def derive_key(context, material):
    return blake3.blake3(material, derive_key_context=context).digest()


def unwrap_slot(slot, secret, kind):
    if slot["kind"] != kind:
        sys.exit(f"the slot is a {slot['kind']} slot")
    salt = bytes.fromhex(slot["salt"])
    if kind == "passphrase":
        kdf = slot["kdf"]
        assert kdf["name"] == "argon2id"
        kek = Argon2id(
            salt=salt,
            length=32,
            iterations=kdf["t"],
            lanes=kdf["p"],
            memory_cost=kdf["m_kib"],
        ).derive(secret)
    else:
        kek = derive_key(KEY_FILE_CONTEXT, salt + secret)
    wrapped = bytes.fromhex(slot["wrapped"])
    return AESGCM(kek).decrypt(b"\0" * 12, wrapped, WRAP_AAD + kind.encode())


def open_sealed(master, kind, place, sealed):
    head = sealed[:48]
    assert head[:8] == b"VSNAPSEA", head[:8]
    (version,) = struct.unpack("<H", head[8:10])
    assert version == 1, version
    assert head[10] == KINDS[kind], (head[10], kind)
    salt = head[16:48]
    body = sealed[48:]
    aad = head + struct.pack("<Q", len(body) - 16) + place.encode()
    seal_key = derive_key(SEAL_CONTEXT, master)
    blob_key = blake3.blake3(salt, key=seal_key).digest()
    return AESGCM(blob_key).decrypt(b"\0" * 12, body, aad)


def main(argv):
    if not argv:
        sys.exit(__doc__)
    if argv[0] == "slot":
        slot = json.load(open(argv[1]))
        how, path = argv[2], argv[3]
        secret = open(path, "rb").read()
        kind = "passphrase" if how == "--passphrase-file" else "key-file"
        print(unwrap_slot(slot, secret, kind).hex())
    elif argv[0] == "open":
        master = bytes.fromhex(argv[1])
        print(open_sealed(master, argv[2], argv[3], open(argv[4], "rb").read()).hex())
    elif argv[0] == "id":
        master = bytes.fromhex(argv[1])
        key = derive_key(ID_CONTEXT, master)
        print(blake3.blake3(open(argv[2], "rb").read(), key=key).hexdigest())
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
