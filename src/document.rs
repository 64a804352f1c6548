//! Documents as mail: the MIME message `sipmail send` and a partner's outbox build, with
//! lettre's message builder. A short text part lists each file with its size and
//! SHA-256; each file follows as an attachment under its own name
//! (application/octet-stream, base64). Pure: names and bytes in, message bytes out.

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use sha2::Digest;

/// Why a message could not be built (an address or name lettre refuses).
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{what} {value:?} is not a usable address: {reason}")]
    Address {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("building the message: {0}")]
    Build(String),
}

/// One document: the file name it travels under, and its bytes.
pub struct Document {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// `NAME  SIZE bytes  sha256 HEX`: the line the text part has for each document.
pub fn listing(d: &Document) -> String {
    format!(
        "{}  {} bytes  sha256 {}",
        d.name,
        d.bytes.len(),
        hex::encode(sha2::Sha256::digest(&d.bytes))
    )
}

/// The message: From `from`, To each of `to`, `subject` (default "Documents: " and the
/// names), Message-ID `<message_id>`, then the text part and the attachments.
pub fn build(
    from: &str,
    to: &[String],
    subject: Option<&str>,
    message_id: &str,
    docs: &[Document],
) -> Result<Vec<u8>, DocumentError> {
    let addr = |what: &'static str, v: &str| {
        v.parse::<Mailbox>().map_err(|e| DocumentError::Address {
            what,
            value: v.to_string(),
            reason: e.to_string(),
        })
    };
    let names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
    let subject = subject
        .map(str::to_string)
        .unwrap_or_else(|| format!("Documents: {}", names.join(", ")));
    let mut b = lettre::Message::builder()
        .from(addr("the sender", from)?)
        .subject(subject)
        .message_id(Some(format!("<{message_id}>")))
        .user_agent(format!("sipmail {}", env!("CARGO_PKG_VERSION")));
    for t in to {
        b = b.to(addr("the recipient", t)?);
    }
    let lines: Vec<String> = docs.iter().map(listing).collect();
    let mut mp = MultiPart::mixed().singlepart(SinglePart::plain(format!(
        "Sent with sipmail. The partner's relay returns a signed receipt for this message.\r\n\r\n{}\r\n",
        lines.join("\r\n")
    )));
    let octets = ContentType::parse("application/octet-stream")
        .map_err(|e| DocumentError::Build(e.to_string()))?;
    for d in docs {
        // Always base64: the bytes arrive exactly, whatever line endings a text file has
        // (7bit or quoted-printable would let a relay normalise them to CRLF).
        let body = Body::new_with_encoding(d.bytes.clone(), ContentTransferEncoding::Base64)
            .map_err(|_| DocumentError::Build(format!("{}: cannot encode", d.name)))?;
        mp = mp.singlepart(Attachment::new(d.name.clone()).body(body, octets.clone()));
    }
    let msg = b
        .multipart(mp)
        .map_err(|e| DocumentError::Build(e.to_string()))?;
    Ok(msg.formatted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    #[test]
    fn attachments_come_back_byte_for_byte_under_their_names() {
        let docs = vec![
            Document {
                name: "a.bin".into(),
                bytes: (0..=255u8).collect(),
            },
            Document {
                name: "Rechnung März.xml".into(),
                bytes: b"<x/>\r\n.\r\n".to_vec(),
            },
            Document {
                name: "lf.csv".into(),
                bytes: b"a\nb\n.\n".to_vec(),
            },
        ];
        let to = vec!["bob@site-b.test".to_string()];
        let m = build("a@site-a.test", &to, None, "id1@site-a.test", &docs).unwrap();
        let parsed = mail_parser::MessageParser::default().parse(&m[..]).unwrap();
        assert_eq!(parsed.message_id(), Some("id1@site-a.test"));
        assert_eq!(
            parsed.subject(),
            Some("Documents: a.bin, Rechnung März.xml, lf.csv")
        );
        let got: Vec<(String, Vec<u8>)> = parsed
            .attachments()
            .map(|p| {
                (
                    p.attachment_name().unwrap().to_string(),
                    p.contents().to_vec(),
                )
            })
            .collect();
        assert_eq!(got.len(), 3);
        // CRLF only on the wire: nothing for a relay to normalise.
        assert!(!m.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
        for (d, (n, b)) in docs.iter().zip(&got) {
            assert_eq!((&d.name, &d.bytes), (n, b));
        }
        let text = parsed.body_text(0).unwrap();
        assert!(docs.iter().all(|d| text.contains(&listing(d))), "{text}");
        assert!(build("not an address", &to, None, "x@y", &docs).is_err());
    }
}
