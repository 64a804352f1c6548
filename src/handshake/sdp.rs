//! sipmail's offer/answer in SDP (RFC 4566, TCP media per RFC 4145), and the confirm body
//! carried by the ACK. Only the parsed fields enter the signed transcript; the SDP text
//! itself is never signed, so re-ordering or re-spacing by a proxy breaks nothing.

use super::{Answer, AuthMode, Confirm, MAX_RETAINED, Offer, RS_ID_LEN, Suite};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::net::{IpAddr, SocketAddr};

pub const CONFIRM_CONTENT_TYPE: &str = "application/sipmail-confirm";
pub const VERSION: &str = "3";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdpError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("bad {what}: {why}")]
    Bad { what: &'static str, why: String },
    #[error("unsupported sipmail version {0}")]
    Version(String),
}

fn bad(what: &'static str, why: impl Into<String>) -> SdpError {
    SdpError::Bad {
        what,
        why: why.into(),
    }
}

/// The lines of a body, as (type char, value) for SDP or (name, value) for attributes.
struct Lines<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Lines<'a> {
    fn new(body: &'a [u8]) -> Result<Self, SdpError> {
        let text = std::str::from_utf8(body).map_err(|_| bad("body", "not UTF-8"))?;
        Ok(Lines {
            lines: text.lines().map(|l| l.trim_end_matches('\r')).collect(),
        })
    }

    /// Value of `a=NAME:value` (SDP) or `NAME:value` (confirm).
    fn attr(&self, name: &str, prefix: &str) -> Option<&'a str> {
        self.lines.iter().find_map(|l| {
            l.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix(name))
                .and_then(|r| r.strip_prefix(':'))
                .map(str::trim)
        })
    }

    fn line(&self, typ: &str) -> Option<&'a str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(typ).map(str::trim))
    }
}

fn fixed32(what: &'static str, v: &str) -> Result<[u8; 32], SdpError> {
    let b = B64.decode(v).map_err(|e| bad(what, e.to_string()))?;
    b.try_into()
        .map_err(|b: Vec<u8>| bad(what, format!("{} bytes, want 32", b.len())))
}

fn fingerprint(v: &str) -> Result<Vec<u8>, SdpError> {
    let compact: String = v.chars().filter(|c| !c.is_whitespace()).collect();
    let b = hex::decode(&compact).map_err(|e| bad("a=sipmail-fingerprint", e.to_string()))?;
    if b.len() != 20 && b.len() != 32 {
        return Err(bad(
            "a=sipmail-fingerprint",
            format!("{} bytes, want 20 or 32", b.len()),
        ));
    }
    Ok(b)
}

/// `a=sipmail-rs:` value: hex IDs separated by commas (absent: none).
fn rs_ids(v: Option<&str>) -> Result<Vec<[u8; RS_ID_LEN]>, SdpError> {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let ids = v
        .split(',')
        .map(|x| {
            let b = hex::decode(x.trim()).map_err(|e| bad("a=sipmail-rs", e.to_string()))?;
            <[u8; RS_ID_LEN]>::try_from(b.as_slice()).map_err(|_| {
                bad(
                    "a=sipmail-rs",
                    format!("an ID is {} bytes, want {RS_ID_LEN}", b.len()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() > MAX_RETAINED {
        return Err(bad("a=sipmail-rs", format!("more than {MAX_RETAINED} IDs")));
    }
    Ok(ids)
}

fn rs_line(ids: &[[u8; RS_ID_LEN]]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let v: Vec<String> = ids.iter().map(hex::encode).collect();
    format!("a=sipmail-rs:{}\r\n", v.join(","))
}

fn pubkey_line(packet: &[u8]) -> String {
    if packet.is_empty() {
        String::new()
    } else {
        format!("a=sipmail-pubkey:{}\r\n", B64.encode(packet))
    }
}

fn pubkey(v: Option<&str>) -> Result<Vec<u8>, SdpError> {
    match v {
        None => Ok(Vec::new()),
        Some(v) => {
            let b = B64
                .decode(v)
                .map_err(|e| bad("a=sipmail-pubkey", e.to_string()))?;
            if b.is_empty() || b.len() > 2048 {
                return Err(bad("a=sipmail-pubkey", format!("{} bytes", b.len())));
            }
            Ok(b)
        }
    }
}

fn ip_line(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("IN IP4 {a}"),
        IpAddr::V6(a) => format!("IN IP6 {a}"),
    }
}

fn check_version(l: &Lines, prefix: &str) -> Result<(), SdpError> {
    let v = l
        .attr("sipmail-version", prefix)
        .ok_or(SdpError::Missing("sipmail-version (not a sipmail offer)"))?;
    if v != VERSION {
        return Err(SdpError::Version(v.to_string()));
    }
    Ok(())
}

/// INVITE body.
pub fn encode_offer(offer: &Offer, session_id: u64, media_ip: IpAddr) -> Vec<u8> {
    let suites: Vec<&str> = offer.suites.iter().map(|s| s.name()).collect();
    format!(
        "v=0\r\no=sipmail {session_id} 1 {ip}\r\ns=sipmail\r\nc={ip}\r\nt=0 0\r\n\
         m=application 9 TCP sipmail\r\na=setup:active\r\na=connection:new\r\n\
         a=sipmail-version:{VERSION}\r\na=sipmail-suites:{}\r\na=sipmail-fingerprint:{}\r\n\
         a=sipmail-nonce:{}\r\na=sipmail-commitment:{}\r\na=sipmail-auth:{}\r\n{}{}",
        suites.join(","),
        hex::encode_upper(&offer.fingerprint),
        B64.encode(offer.nonce),
        B64.encode(offer.commitment),
        offer.auth.name(),
        rs_line(&offer.rs_ids),
        pubkey_line(&offer.key_packet),
        ip = ip_line(media_ip),
    )
    .into_bytes()
}

pub fn decode_offer(body: &[u8]) -> Result<Offer, SdpError> {
    let l = Lines::new(body)?;
    check_version(&l, "a=")?;
    let m = l.line("m=").ok_or(SdpError::Missing("m= line"))?;
    if !m.starts_with("application ") || !m.contains(" TCP ") {
        return Err(bad(
            "m= line",
            format!("\"{m}\" is not \"application 9 TCP sipmail\""),
        ));
    }
    let suites_s = l
        .attr("sipmail-suites", "a=")
        .ok_or(SdpError::Missing("a=sipmail-suites"))?;
    // Unknown suite names are skipped, not fatal: a newer peer may offer more.
    let suites: Vec<Suite> = suites_s
        .split(',')
        .filter_map(|s| Suite::from_name(s.trim()))
        .collect();
    let fingerprint = fingerprint(
        l.attr("sipmail-fingerprint", "a=")
            .ok_or(SdpError::Missing("a=sipmail-fingerprint"))?,
    )?;
    let nonce = fixed32(
        "a=sipmail-nonce",
        l.attr("sipmail-nonce", "a=")
            .ok_or(SdpError::Missing("a=sipmail-nonce"))?,
    )?;
    let commitment = fixed32(
        "a=sipmail-commitment",
        l.attr("sipmail-commitment", "a=")
            .ok_or(SdpError::Missing("a=sipmail-commitment"))?,
    )?;
    let auth_s = l
        .attr("sipmail-auth", "a=")
        .ok_or(SdpError::Missing("a=sipmail-auth"))?;
    let auth = AuthMode::from_name(auth_s).ok_or_else(|| {
        bad(
            "a=sipmail-auth",
            format!("unknown trust policy \"{auth_s}\" (signed, psk, opportunistic)"),
        )
    })?;
    Ok(Offer {
        suites,
        fingerprint,
        nonce,
        commitment,
        auth,
        rs_ids: rs_ids(l.attr("sipmail-rs", "a="))?,
        key_packet: pubkey(l.attr("sipmail-pubkey", "a="))?,
    })
}

/// 200 OK body: the answer, with where the media listens (`answer.media`, which the
/// callee's signature covers).
pub fn encode_answer(answer: &Answer, session_id: u64) -> Vec<u8> {
    let media = answer.media;
    format!(
        "v=0\r\no=sipmail {session_id} 1 {ip}\r\ns=sipmail\r\nc={ip}\r\nt=0 0\r\n\
         m=application {port} TCP sipmail\r\na=setup:passive\r\na=connection:new\r\n\
         a=sipmail-version:{VERSION}\r\na=sipmail-suite:{}\r\na=sipmail-fingerprint:{}\r\n\
         a=sipmail-key:{}\r\na=sipmail-signature:{}\r\n{}{}",
        answer.suite.name(),
        hex::encode_upper(&answer.fingerprint),
        B64.encode(answer.public),
        B64.encode(&answer.signature),
        rs_line(&answer.rs_ids),
        pubkey_line(&answer.key_packet),
        ip = ip_line(media.ip()),
        port = media.port(),
    )
    .into_bytes()
}

pub fn decode_answer(body: &[u8]) -> Result<Answer, SdpError> {
    let l = Lines::new(body)?;
    check_version(&l, "a=")?;
    let c = l.line("c=").ok_or(SdpError::Missing("c= line"))?;
    let ip: IpAddr = c
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad("c= line", format!("\"{c}\" has no IP address")))?;
    let m = l.line("m=").ok_or(SdpError::Missing("m= line"))?;
    let port: u16 = m
        .split(' ')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("m= line", format!("\"{m}\" has no media port")))?;
    let suite_s = l
        .attr("sipmail-suite", "a=")
        .ok_or(SdpError::Missing("a=sipmail-suite"))?;
    let suite = Suite::from_name(suite_s)
        .ok_or_else(|| bad("a=sipmail-suite", format!("unknown suite \"{suite_s}\"")))?;
    let fingerprint = fingerprint(
        l.attr("sipmail-fingerprint", "a=")
            .ok_or(SdpError::Missing("a=sipmail-fingerprint"))?,
    )?;
    let public = fixed32(
        "a=sipmail-key",
        l.attr("sipmail-key", "a=")
            .ok_or(SdpError::Missing("a=sipmail-key"))?,
    )?;
    let signature = B64
        .decode(
            l.attr("sipmail-signature", "a=")
                .ok_or(SdpError::Missing("a=sipmail-signature"))?,
        )
        .map_err(|e| bad("a=sipmail-signature", e.to_string()))?;
    Ok(Answer {
        media: SocketAddr::new(ip, port),
        suite,
        fingerprint,
        public,
        signature,
        rs_ids: rs_ids(l.attr("sipmail-rs", "a="))?,
        key_packet: pubkey(l.attr("sipmail-pubkey", "a="))?,
    })
}

/// ACK body (Content-Type application/sipmail-confirm).
pub fn encode_confirm(c: &Confirm) -> Vec<u8> {
    format!(
        "sipmail-version:{VERSION}\r\nsipmail-key:{}\r\nsipmail-signature:{}\r\n",
        B64.encode(c.public),
        B64.encode(&c.signature)
    )
    .into_bytes()
}

pub fn decode_confirm(body: &[u8]) -> Result<Confirm, SdpError> {
    let l = Lines::new(body)?;
    check_version(&l, "")?;
    let public = fixed32(
        "sipmail-key",
        l.attr("sipmail-key", "")
            .ok_or(SdpError::Missing("sipmail-key"))?,
    )?;
    let signature = B64
        .decode(
            l.attr("sipmail-signature", "")
                .ok_or(SdpError::Missing("sipmail-signature"))?,
        )
        .map_err(|e| bad("sipmail-signature", e.to_string()))?;
    Ok(Confirm { public, signature })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_answer_confirm_round_trip() {
        let offer = Offer {
            suites: vec![Suite::ChaCha20Poly1305],
            fingerprint: vec![0xab; 20],
            nonce: [1; 32],
            commitment: [2; 32],
            auth: AuthMode::Opportunistic,
            rs_ids: vec![[5; 8], [6; 8]],
            key_packet: vec![7; 51],
        };
        let b = encode_offer(&offer, 42, "127.0.0.1".parse().unwrap());
        assert_eq!(decode_offer(&b).unwrap(), offer);
        for media in ["127.0.0.2:40000", "[2001:db8::7]:40001"] {
            let answer = Answer {
                media: media.parse().unwrap(),
                suite: Suite::ChaCha20Poly1305,
                fingerprint: vec![0xcd; 20],
                public: [3; 32],
                signature: vec![9; 119],
                rs_ids: vec![[8; 8]],
                key_packet: Vec::new(),
            };
            let b = encode_answer(&answer, 42);
            assert_eq!(decode_answer(&b).unwrap(), answer);
        }
        let c = Confirm {
            public: [4; 32],
            signature: vec![8; 119],
        };
        assert_eq!(decode_confirm(&encode_confirm(&c)).unwrap(), c);
    }

    #[test]
    fn a_plain_audio_offer_is_not_a_sipmail_offer() {
        let sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
        assert!(matches!(decode_offer(sdp), Err(SdpError::Missing(_))));
    }

    #[test]
    fn bad_fields_are_named() {
        let offer = Offer {
            suites: vec![Suite::ChaCha20Poly1305],
            fingerprint: vec![1; 20],
            nonce: [1; 32],
            commitment: [2; 32],
            auth: AuthMode::Signed,
            rs_ids: Vec::new(),
            key_packet: Vec::new(),
        };
        let text =
            String::from_utf8(encode_offer(&offer, 1, "127.0.0.1".parse().unwrap())).unwrap();
        let broken = text.replace("a=sipmail-nonce:", "a=sipmail-nonce:AAAA");
        assert!(matches!(
            decode_offer(broken.as_bytes()),
            Err(SdpError::Bad {
                what: "a=sipmail-nonce",
                ..
            })
        ));
        for old in ["1", "2"] {
            let broken = text.replace("a=sipmail-version:3", &format!("a=sipmail-version:{old}"));
            assert_eq!(
                decode_offer(broken.as_bytes()),
                Err(SdpError::Version(old.into()))
            );
        }
        let broken = text.replace("a=sipmail-auth:signed", "a=sipmail-auth:none");
        assert!(matches!(
            decode_offer(broken.as_bytes()),
            Err(SdpError::Bad {
                what: "a=sipmail-auth",
                ..
            })
        ));
        let broken = text.replace("a=sipmail-auth:signed\r\n", "");
        assert_eq!(
            decode_offer(broken.as_bytes()),
            Err(SdpError::Missing("a=sipmail-auth"))
        );
    }
}
