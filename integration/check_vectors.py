#!/usr/bin/env python3
"""Recompute the test vectors of docs/PROTOCOL.md from the specification alone, with
Python's `cryptography` package: an implementation that shares no code with sipmail.
Exit 0 if every value matches the document."""
import base64, hashlib, hmac, ipaddress, re, struct, sys, pathlib
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives import hashes, serialization

def hkdf_extract(salt, ikm):
    return hmac.new(salt, ikm, hashlib.sha256).digest()

def expand(prk, info, n):
    return HKDFExpand(hashes.SHA256(), n, info).derive(prk)

def field(tag, value):
    return bytes([tag]) + struct.pack(">H", len(value)) + value

def pub(secret):
    k = X25519PrivateKey.from_private_bytes(secret)
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

ea, eb = bytes([1]) * 32, bytes([2]) * 32
ea_pub, eb_pub = pub(ea), pub(eb)
nonce = bytes([7]) * 32
commit = hashlib.sha256(b"sipmail/1 commitment\0" + ea_pub).digest()
ss = X25519PrivateKey.from_private_bytes(ea).exchange(X25519PrivateKey.from_private_bytes(eb).public_key())

def rs_id(rs, role):
    return hmac.new(rs, b"sipmail/1 rs " + role, hashlib.sha256).digest()[:8]

# The callee's media address 127.0.0.1:40000: family 4, the address, the port big endian.
media = bytes([4]) + ipaddress.IPv4Address("127.0.0.1").packed + struct.pack(">H", 40000)

def transcripts(auth, caller_ids, callee_ids):
    t1 = b"".join([
        field(0x01, b"sipmail/3"),
        field(0x02, b"c0ffee@site-a.test"),
        field(0x03, b"a1"),
        field(0x04, b"b2"),
        field(0x05, b"mail@site-a.test"),
        field(0x06, b"mail@site-b.test"),
        field(0x07, bytes([1])),
        field(0x08, nonce),
        field(0x09, commit),
        field(0x0A, bytes([0xAA]) * 20),
        field(0x0B, bytes([1])),
        field(0x0C, eb_pub),
        field(0x0D, bytes([0xBB]) * 20),
        field(0x0F, bytes([auth])),
        field(0x10, b"".join(caller_ids)),
        field(0x11, b"".join(callee_ids)),
        field(0x12, media),
    ])
    return t1, t1 + field(0x0E, ea_pub)

def schedule(t2, rs, psk=None):
    th2 = hashlib.sha256(t2).digest()
    # With a PSK, the salt of the DH extraction is itself an extraction of the PSK.
    salt = th2 if psk is None else hkdf_extract(th2, psk)
    prk = hkdf_extract(salt, ss + rs)
    keys = {
        "TH2": th2,
        "k_ab": expand(prk, b"sipmail/1 key caller->callee", 32),
        "iv_ab": expand(prk, b"sipmail/1 iv caller->callee", 12),
        "k_ba": expand(prk, b"sipmail/1 key callee->caller", 32),
        "iv_ba": expand(prk, b"sipmail/1 iv callee->caller", 12),
        "rs_next": expand(prk, b"sipmail/1 retained secret", 32),
    }
    sas_bits = int.from_bytes(expand(prk, b"sipmail/1 sas", 4), "big") >> 12
    alphabet = "ybndrfg8ejkmcpqxot1uwisza345h769"
    keys["SAS"] = "".join(alphabet[(sas_bits >> (15 - 5 * i)) & 31] for i in range(4))
    return keys

# Set 1: trust policy signed (1), no retained secrets.
t1, t2 = transcripts(1, [], [])
k = schedule(t2, b"")
k_ab, iv_ab = k["k_ab"], k["iv_ab"]

def record(seq, typ, payload):
    header = struct.pack(">I", 1 + len(payload) + 16)
    nonce = bytearray(iv_ab)
    for i, b in enumerate(struct.pack(">Q", seq)):
        nonce[4 + i] ^= b
    return header + ChaCha20Poly1305(k_ab).encrypt(bytes(nonce), bytes([typ]) + payload, header)

records = record(0, 0x17, b"") + record(1, 0x17, b"EHLO site-a.test\r\n")
computed = {"T2": t2.hex(), "records": records.hex(), "SAS": k["SAS"]}
for name in ["TH2", "k_ab", "iv_ab", "k_ba", "iv_ba", "rs_next"]:
    computed[name] = k[name].hex()

# Set 2: trust policy psk (2), both sides hold rs = 32 bytes of 0x33.
psk_file = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
psk = base64.b64decode(psk_file, validate=True)
assert psk == bytes(range(32))
rs = bytes([0x33]) * 32
id_a, id_b = rs_id(rs, b"caller"), rs_id(rs, b"callee")
t1, t2 = transcripts(2, [id_a], [id_b])
k = schedule(t2, rs, psk)
computed.update({
    "psk_rs_id_caller": id_a.hex(),
    "psk_rs_id_callee": id_b.hex(),
    "psk_T2": t2.hex(),
    "psk_mac_answer": hmac.new(psk, b"sipmail/1 answer signature\0" + t1, hashlib.sha256).hexdigest(),
    "psk_mac_confirm": hmac.new(psk, b"sipmail/1 confirm signature\0" + t2, hashlib.sha256).hexdigest(),
    "psk_k_ab": k["k_ab"].hex(),
    "psk_k_ba": k["k_ba"].hex(),
    "psk_SAS": k["SAS"],
    "psk_rs_next": k["rs_next"].hex(),
})
doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
# The receipt vector: SHA-256 of the document block under "### Receipt document".
_blk = re.search(r"### Receipt document.*?```text\n(.*?)```", doc, re.S)
computed["receipt_sha256"] = hashlib.sha256(_blk.group(1).encode()).hexdigest() if _blk else "missing"
bad = 0
if "--print" in sys.argv:
    for name, value in computed.items():
        print(f"{name} = {value}")
    sys.exit(0)
for name, value in computed.items():
    m = re.search(r"^%s\s*=\s*([0-9a-z]+)\s*$" % re.escape(name), doc, re.M)
    if not m:
        print(f"MISSING {name} in docs/PROTOCOL.md (computed {value})"); bad += 1
    elif m.group(1) != value:
        print(f"MISMATCH {name}: document {m.group(1)} computed {value}"); bad += 1
    else:
        print(f"ok {name}")
sys.exit(1 if bad else 0)
