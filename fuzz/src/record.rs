//! The `record` target: the AEAD record layer (`sipmail::tunnel::record`).
//!
//! Two modes, chosen by the first input byte:
//! * **open** (bit 0 clear): an `Opener`, keyed from the input, is fed the rest of the
//!   input as a record stream, in chunks as a socket delivers them. It must never panic,
//!   every range it returns must lie inside the record it consumed, and nothing may be
//!   opened after CLOSE.
//! * **round trip** (bit 0 set): the input scripts a sealer (suite, ratchet limits,
//!   payloads of 0..=64 KiB + 1, CLOSE or not). Whatever the `Sealer` produces, an `Opener`
//!   with the same keys must open exactly: the same payloads in order, a KEY_UPDATE for
//!   every ratchet, CLOSE iff sealed, every byte consumed, however the stream is chunked.
//!   Then one mutation (bit flip, byte change, truncation, deletion, insertion, record
//!   dropped / duplicated / swapped / replaced by one from the other direction or the other
//!   suite) is applied, and the mutated stream must be rejected: what opens must be a
//!   prefix of the original records, and it must never be a complete, closed stream.

use crate::Input;
use sipmail::handshake::{DirectionKeys, Suite};
use sipmail::tunnel::record::{
    HEADER_LEN, Limits, MAX_PAYLOAD, Opened, Opener, RecordError, Sealer, TAG_LEN,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Data(Vec<u8>),
    Close,
    KeyUpdate,
}

struct Opening {
    items: Vec<Item>,
    error: Option<RecordError>,
    /// Every byte was consumed by an opened record.
    consumed_all: bool,
}

impl Opening {
    fn closed_complete(&self) -> bool {
        self.error.is_none() && self.consumed_all && self.items.last() == Some(&Item::Close)
    }
}

/// Open `wire` the way the stream adapter does: bytes arrive in chunks (sizes from
/// `chunks`, cycled), and after each arrival every whole record in the buffer is opened.
fn open_stream(op: &mut Opener, wire: &[u8], chunks: &[u8]) -> Opening {
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0usize;
    let mut items = Vec::new();
    let mut k = 0usize;
    while fed < wire.len() {
        let step = chunks.get(k % chunks.len().max(1)).copied().unwrap_or(0) as usize;
        k += 1;
        // 0 means "everything at once"; otherwise 1..=255 bytes, or x 256 for larger steps.
        let step = match step {
            0 => wire.len(),
            s if s >= 200 => (s - 199) * 256,
            s => s,
        };
        let end = (fed + step).min(wire.len());
        buf.extend_from_slice(&wire[fed..end]);
        fed = end;
        loop {
            let before = buf.len();
            let was_closed = op.is_closed();
            match op.open(&mut buf) {
                Ok(None) => break,
                Ok(Some((opened, used))) => {
                    assert!(!was_closed, "a record was opened after CLOSE");
                    assert!(
                        (HEADER_LEN + 1 + TAG_LEN..=before).contains(&used),
                        "used {used} of {before} bytes"
                    );
                    let item = match opened {
                        Opened::Data(r) => {
                            assert!(
                                r.start == HEADER_LEN + 1 && r.end + TAG_LEN == used,
                                "data range {r:?} for a record of {used} bytes"
                            );
                            Item::Data(buf[r].to_vec())
                        }
                        Opened::Close => Item::Close,
                        Opened::KeyUpdate => Item::KeyUpdate,
                    };
                    items.push(item);
                    buf.drain(..used);
                }
                Err(e) => {
                    if was_closed
                        && Opener::record_len(&buf)
                            .ok()
                            .flatten()
                            .is_some_and(|n| n <= buf.len())
                    {
                        assert_eq!(e, RecordError::AfterClose, "a record after CLOSE");
                    }
                    return Opening {
                        items,
                        error: Some(e),
                        consumed_all: false,
                    };
                }
            }
        }
    }
    Opening {
        items,
        error: None,
        consumed_all: buf.is_empty(),
    }
}

fn keys_from(inp: &mut Input<'_>) -> DirectionKeys {
    let key = inp.array();
    let iv_src = inp.array();
    let mut iv = [0u8; 12];
    iv.copy_from_slice(&iv_src[..12]);
    DirectionKeys { key, iv }
}

fn suite(bit: bool) -> Suite {
    if bit {
        Suite::Aes256Gcm
    } else {
        Suite::ChaCha20Poly1305
    }
}

/// Offsets of the records in a well-formed stream.
fn record_bounds(wire: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Ok(Some(n)) = Opener::record_len(&wire[off..]) {
        if off + n > wire.len() {
            break;
        }
        out.push((off, off + n));
        off += n;
    }
    out
}

pub fn record_target(data: &[u8]) {
    let mut inp = Input(data);
    let mode = inp.byte();
    let s = suite(mode & 0x02 != 0);
    let keys = keys_from(&mut inp);
    if mode & 0x01 == 0 {
        let chunks = inp.chunk().to_vec();
        let wire = inp.rest();
        let mut op = Opener::with_suite(s, &keys);
        let _ = open_stream(&mut op, wire, &chunks);
        let _ = Opener::record_len(wire);
        return;
    }

    // Round trip.
    let limits = if mode & 0x04 != 0 {
        Limits {
            update_after_records: 1 + u64::from(inp.byte() % 8),
            update_after_bytes: 1 + u64::from(inp.byte()) * 64,
            hard_limit_records: 64,
        }
    } else {
        Limits::default()
    };
    let close = mode & 0x08 != 0;
    let mut sealer = Sealer::with_suite(s, &keys, limits);
    let mut wire = Vec::new();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    let count = inp.byte() % 12;
    for _ in 0..count {
        let kind = inp.byte();
        let payload: Vec<u8> = match kind {
            // Boundary sizes, filled with a byte from the input.
            250 => vec![inp.byte(); MAX_PAYLOAD],
            251 => vec![inp.byte(); MAX_PAYLOAD + 1],
            252 => vec![inp.byte(); 16 * 1024],
            k => inp.bytes(usize::from(k)).to_vec(),
        };
        let before = wire.len();
        match sealer.seal_data(&payload, &mut wire) {
            Ok(()) => expected.push(payload),
            Err(RecordError::PayloadTooLarge(n)) => {
                assert!(n > MAX_PAYLOAD, "{n} bytes refused as too large");
                // A KEY_UPDATE may have gone out before the refusal; nothing else.
                assert!(wire.len() == before || wire.len() == before + HEADER_LEN + 1 + TAG_LEN);
            }
            Err(RecordError::SequenceExhausted) => {
                assert!(limits.hard_limit_records < u64::MAX);
                break;
            }
            Err(e) => panic!("sealing failed: {e}"),
        }
    }
    if close {
        sealer.seal_close(&mut wire).expect("close");
        assert_eq!(
            sealer.seal_data(b"x", &mut wire),
            Err(RecordError::AfterClose)
        );
    }
    let chunks = inp.chunk().to_vec();
    let mut op = Opener::with_suite(s, &keys);
    let got = open_stream(&mut op, &wire, &chunks);
    assert!(
        got.error.is_none(),
        "our own stream failed: {:?}",
        got.error
    );
    assert!(got.consumed_all, "bytes left over in our own stream");
    let data_items: Vec<Vec<u8>> = got
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Data(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(data_items, expected, "payloads differ after the round trip");
    let updates = got.items.iter().filter(|i| **i == Item::KeyUpdate).count();
    assert_eq!(updates as u32, sealer.epoch(), "one KEY_UPDATE per ratchet");
    assert_eq!(got.items.last() == Some(&Item::Close), close);
    assert_eq!(op.is_closed(), close);
    let overhead = HEADER_LEN + 1 + TAG_LEN;
    let want_len: usize = expected.iter().map(|p| p.len() + overhead).sum::<usize>()
        + (updates + usize::from(close)) * overhead;
    assert_eq!(wire.len(), want_len, "stream length");

    // One mutation; the stream must be rejected.
    if wire.is_empty() {
        return;
    }
    let mut bad = wire.clone();
    let recs = record_bounds(&wire);
    let pick = |n: usize, inp: &mut Input<'_>| {
        let v = u32::from_be_bytes([inp.byte(), inp.byte(), inp.byte(), inp.byte()]) as usize;
        v % n.max(1)
    };
    match inp.byte() % 10 {
        0 => {
            let bit = pick(wire.len() * 8, &mut inp);
            bad[bit / 8] ^= 1 << (bit % 8);
        }
        1 => {
            let i = pick(wire.len(), &mut inp);
            bad[i] = bad[i].wrapping_add(1 + inp.byte() % 255);
        }
        2 => bad.truncate(pick(wire.len(), &mut inp)),
        3 => {
            let i = pick(wire.len(), &mut inp);
            let n = 1 + pick((wire.len() - i).min(64), &mut inp);
            bad.drain(i..i + n);
        }
        4 => {
            let i = pick(wire.len() + 1, &mut inp);
            bad.insert(i, inp.byte());
        }
        5 => {
            // Drop a record.
            let (a, b) = recs[pick(recs.len(), &mut inp)];
            bad.drain(a..b);
        }
        6 => {
            // Duplicate (replay) a record in place.
            let (a, b) = recs[pick(recs.len(), &mut inp)];
            let r = wire[a..b].to_vec();
            bad.splice(b..b, r);
        }
        7 => {
            // Swap two records.
            let i = pick(recs.len(), &mut inp);
            let j = pick(recs.len(), &mut inp);
            let (i, j) = (i.min(j), i.max(j));
            if i != j {
                let (a1, b1) = recs[i];
                let (a2, b2) = recs[j];
                let mut v = wire[..a1].to_vec();
                v.extend_from_slice(&wire[a2..b2]);
                v.extend_from_slice(&wire[b1..a2]);
                v.extend_from_slice(&wire[a1..b1]);
                v.extend_from_slice(&wire[b2..]);
                bad = v;
            }
        }
        8 | 9 => {
            // Replace a record by the same record sealed with other keys (the other
            // direction: one key bit differs) or the other suite.
            let i = pick(recs.len(), &mut inp);
            let mut other_keys = keys.clone();
            let other_suite = if inp.byte() & 1 == 0 {
                other_keys.key[0] ^= 1;
                s
            } else {
                suite(s == Suite::ChaCha20Poly1305)
            };
            let mut other = Sealer::with_suite(other_suite, &other_keys, limits);
            let mut ow = Vec::new();
            for item in &got.items {
                match item {
                    Item::Data(d) => other.seal_data(d, &mut ow).expect("reseal"),
                    Item::Close => other.seal_close(&mut ow).expect("reseal close"),
                    Item::KeyUpdate => {}
                }
            }
            let orecs = record_bounds(&ow);
            if let (Some(&(a, b)), Some(&(oa, ob))) = (recs.get(i), orecs.get(i)) {
                bad.splice(a..b, ow[oa..ob].iter().copied());
            }
        }
        _ => unreachable!(),
    }
    if bad == wire {
        return;
    }
    let mut op = Opener::with_suite(s, &keys);
    let res = open_stream(&mut op, &bad, &chunks);
    assert!(
        got.items.starts_with(&res.items),
        "a mutated stream opened to records that were never sealed: {:?}",
        res.items
    );
    assert!(
        !res.closed_complete(),
        "a mutated stream was accepted as complete and closed"
    );
    if !close {
        // Without CLOSE, the only thing a mutation may achieve is a shorter stream.
        assert!(res.items.len() <= got.items.len());
    }
}

/// Seeds: each mode, both suites, small and boundary payloads, ratchets, every mutation.
pub fn seeds_record() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for suite_bit in [0u8, 0x02] {
        // Open mode: a real stream under the input's key, so mutations start from records
        // that authenticate.
        let keys = DirectionKeys {
            key: [0x11; 32],
            iv: [0x22; 12],
        };
        let mut s = Sealer::with_suite(suite(suite_bit != 0), &keys, Limits::default());
        let mut w = Vec::new();
        s.seal_data(b"", &mut w).expect("seal");
        s.seal_data(b"EHLO site-a.test\r\n", &mut w).expect("seal");
        s.seal_close(&mut w).expect("close");
        let mut v = vec![suite_bit];
        v.extend_from_slice(&[0x11; 32]);
        v.extend_from_slice(&[0x22; 12]);
        v.extend_from_slice(&[0x22; 20]);
        v.extend_from_slice(&[3, 1, 7, 0]);
        v.extend_from_slice(&w);
        out.push(v);
        for mutation in 0u8..10 {
            for flags in [0x01u8, 0x05, 0x09, 0x0d] {
                let mut v = vec![flags | suite_bit];
                v.extend_from_slice(&[0x33; 64]);
                if flags & 0x04 != 0 {
                    v.extend_from_slice(&[2, 1]);
                }
                v.push(5); // payloads
                v.extend_from_slice(&[0]);
                v.extend_from_slice(&[18]);
                v.extend_from_slice(b"MAIL FROM:<a@b>\r\n.");
                v.extend_from_slice(&[252, b'x']);
                v.extend_from_slice(&[if mutation == 0 { 250 } else { 3 }, b'y', b'z', b'w']);
                v.extend_from_slice(&[251, b'q']);
                v.extend_from_slice(&[2, 0, 5]); // chunking
                v.push(mutation);
                v.extend_from_slice(&[0, 0, 1, 7, 0x40, 2, 3, 4, 5]);
                out.push(v);
            }
        }
    }
    out
}
