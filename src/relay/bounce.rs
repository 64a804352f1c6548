//! Delivery status notifications (RFC 3464) for recipients that failed for good.
//!
//! Built by hand rather than with lettre: lettre 0.11's MIME builder has no
//! `multipart/report` kind. The tests parse the result with mail-parser.

pub(crate) use super::schedule::{DsnKind as Kind, Failure};
use super::site::Site;
use crate::queue::{Envelope, RcptState, Recipient, Spool};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

/// With `RET=FULL`, messages up to this size come back whole; larger ones (and all
/// others) come back as their header block.
const FULL_RETURN_MAX: u64 = 10 * 1024 * 1024;

fn header_safe(s: &str) -> String {
    super::trace::clean(s)
}

/// What the DSN returns of the original: its header block, or (`full`) all of it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Returned<'a> {
    pub bytes: &'a [u8],
    pub full: bool,
}

/// The DSN's bytes.
pub(crate) fn build(
    hostname: &str,
    queue_id: &str,
    original: &Envelope,
    failures: &[Failure],
    returned: Returned<'_>,
    kind: Kind,
    now: SystemTime,
) -> Vec<u8> {
    let (headers, full) = (returned.bytes, returned.full);
    let (subject, summary, action) = match kind {
        Kind::Failed => (
            "Undelivered Mail Returned to Sender".to_string(),
            "could not be delivered to one or more\r\nrecipients.".to_string(),
            "failed",
        ),
        Kind::Delayed { until } => (
            "Delayed Mail (still being retried)".to_string(),
            format!(
                "has not been delivered yet to one or more\r\nrecipients. \
                 No action is required: sipmail keeps trying until\r\n{}.",
                super::trace::rfc5322_date(until)
            ),
            "delayed",
        ),
    };
    let boundary = format!("{queue_id}.dsn/{hostname}");
    let date = super::trace::rfc5322_date(now);
    let arrival = super::trace::rfc5322_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(original.received),
    );
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{queue_id}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n--{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the sipmail relay at {hostname}.\r\n\
         \r\n\
         Your message (queue ID {queue_id}) {summary} {returned_what}\r\n\
         \r\n",
        to = header_safe(&original.mail_from),
        returned_what = if full {
            "It is attached below."
        } else {
            "Its headers are attached below, without the body."
        },
    ));
    for f in failures {
        m.push_str(&format!(
            "<{}>: {}\r\n",
            header_safe(&f.rcpt),
            header_safe(&f.diagnostic)
        ));
    }
    m.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Sipmail-Queue-ID: {queue_id}\r\n\
         Arrival-Date: {arrival}\r\n"
    ));
    if let Some(envid) = &original.envid {
        m.push_str(&format!("Original-Envelope-Id: {}\r\n", header_safe(envid)));
    }
    for f in failures {
        m.push('\r');
        m.push('\n');
        if let Some(o) = &f.orcpt {
            m.push_str(&format!(
                "Original-Recipient: rfc822; {}\r\n",
                header_safe(o)
            ));
        }
        m.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\nAction: {action}\r\nStatus: {}\r\n",
            header_safe(&f.rcpt),
            header_safe(&f.status)
        ));
        if let Kind::Delayed { until } = kind {
            m.push_str(&format!(
                "Will-Retry-Until: {}\r\n",
                super::trace::rfc5322_date(until)
            ));
        }
        if let Some(r) = &f.remote {
            m.push_str(&format!("Remote-MTA: dns; {}\r\n", header_safe(r)));
        }
        m.push_str(&format!(
            "Diagnostic-Code: {}\r\n",
            header_safe(&f.diagnostic)
        ));
    }
    let (what, ctype) = if full {
        ("Undelivered Message", "message/rfc822")
    } else {
        ("Undelivered Message Headers", "text/rfc822-headers")
    };
    m.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Description: {what}\r\n\
         Content-Type: {ctype}\r\n\
         \r\n"
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(headers);
    if !headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// What became of a DSN.
#[derive(Debug)]
pub(crate) enum Queued {
    /// In the spool; the caller puts this envelope in the queue.
    Yes(Box<Envelope>),
    /// None is sent (null sender, or no route back): nothing to keep the original for.
    NotNeeded,
    /// Could not be written: the caller keeps the original message.
    Failed,
}

/// Write a DSN to the original sender into the spool.
pub(crate) async fn queue(
    spool: &Spool,
    site: &Site,
    original: &Envelope,
    failures: &[Failure],
    kind: Kind,
) -> Queued {
    if original.mail_from.is_empty() {
        // RFC 5321 §4.5.5: never bounce a bounce.
        tracing::warn!(queue_id = %original.id, "not bouncing a message from the null sender <>");
        return Queued::NotNeeded;
    }
    let route = match site.route_for(&original.mail_from) {
        Ok(route) => route,
        Err(why) => {
            tracing::error!(queue_id = %original.id, sender = %original.mail_from, reason = %why,
                "cannot return a bounce: the routing table has no route to the sender's domain");
            return Queued::NotNeeded;
        }
    };
    // Only a bounce that goes to a partner needs its digest, for the receipt check.
    let to_partner = matches!(route, crate::queue::Route::Peer(_));
    // A delay warning returns the headers only, whatever RET says (RFC 3461 §4.3).
    let want_full = kind == Kind::Failed
        && original.ret == Some(crate::smtp::Ret::Full)
        && original.size <= FULL_RETURN_MAX;
    let whole = if want_full {
        match tokio::fs::read(spool.body_path(&original.id)).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(queue_id = %original.id, error = %e, "RET=FULL: cannot read the message; returning its headers");
                None
            }
        }
    } else {
        None
    };
    let (returned, full) = match whole {
        Some(b) => (b, true),
        None => (spool.read_headers(&original.id, 64 * 1024).await, false),
    };
    let id = Spool::new_id();
    let dsn = build(
        &site.hostname,
        &original.id,
        original,
        failures,
        Returned {
            bytes: &returned,
            full,
        },
        kind,
        SystemTime::now(),
    );
    let result = async {
        let mut f = spool.create_body(&id).await?;
        f.write_all(&dsn).await?;
        let env = Envelope {
            id: id.clone(),
            received: crate::queue::now_ms() / 1000,
            client: format!("bounce of {}", original.id),
            helo: site.hostname.clone(),
            mail_from: String::new(),
            recipients: vec![Recipient {
                addr: original.mail_from.clone(),
                route,
                state: RcptState::Pending,
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
                // RFC 3461 §6.2: a DSN is sent with NOTIFY=NEVER semantics.
                dsn: crate::smtp::RcptParams {
                    notify: Some(crate::smtp::Notify::NEVER),
                    orcpt: None,
                },
                delay_warned: false,
                pin: None,
            }],
            size: dsn.len() as u64,
            body_8bit: true,
            smtputf8: !original.mail_from.is_ascii(),
            ret: None,
            envid: None,
            held: false,
            expired: false,
            receipt: None,
            decoded: to_partner.then(|| Box::new(crate::queue::DecodedBody::of(&dsn))),
            body_crc32: None,
            body_inline: None,
        };
        spool.commit(f, &env).await?;
        Ok::<_, std::io::Error>(env)
    }
    .await;
    match result {
        Ok(env) => {
            tracing::info!(queue_id = %id, original = %original.id, to = %original.mail_from,
                recipients = failures.len(), kind = ?kind, "bounce queued");
            Queued::Yes(Box::new(env))
        }
        Err(e) => {
            spool.discard(&id).await;
            tracing::error!(queue_id = %original.id, error = %e, "could not queue the bounce; keeping the message");
            Queued::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    #[test]
    fn dsn_is_a_well_formed_multipart_report() {
        let env = Envelope {
            id: "Q1".into(),
            received: 1_795_350_896,
            client: "127.0.0.1".into(),
            helo: "h".into(),
            mail_from: "alice@site-a.test".into(),
            recipients: vec![],
            size: 10,
            body_8bit: false,
            smtputf8: false,
            ret: None,
            envid: Some("env-42".into()),
            held: false,
            expired: false,
            receipt: None,
            decoded: None,
            body_crc32: None,
            body_inline: None,
        };
        let failures = vec![Failure {
            rcpt: "nobody@site-b.test".into(),
            status: "5.1.1".into(),
            diagnostic: "smtp; 550 5.1.1 <nobody@site-b.test>: Recipient address rejected".into(),
            remote: Some("site-b.test".into()),
            orcpt: Some("nobody@site-b.test".into()),
        }];
        let headers =
            b"From: alice@site-a.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\nMessage-ID: <x@y>\r\n";
        let dsn = build(
            "relay.site-a.test",
            "Q1",
            &env,
            &failures,
            Returned {
                bytes: headers,
                full: false,
            },
            Kind::Failed,
            SystemTime::now(),
        );
        let msg = mail_parser::MessageParser::default()
            .parse(&dsn)
            .expect("parses");
        let ct = msg.content_type().expect("content type");
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(
            msg.parts.len(),
            4,
            "root + text + delivery-status + headers"
        );
        let report = String::from_utf8_lossy(msg.parts[2].contents());
        assert!(
            report.contains("Final-Recipient: rfc822; nobody@site-b.test"),
            "{report}"
        );
        assert!(report.contains("Action: failed"));
        assert!(report.contains("Status: 5.1.1"));
        assert!(report.contains("Original-Envelope-Id: env-42"), "{report}");
        assert!(
            report.contains("Original-Recipient: rfc822; nobody@site-b.test"),
            "{report}"
        );
        assert!(report.contains("Reporting-MTA: dns; relay.site-a.test"));
        let orig = msg.parts[3].contents();
        assert!(
            orig.windows(12).any(|w| w == b"Message-ID: "),
            "original headers are included"
        );
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(
            msg.header("Auto-Submitted").and_then(|h| h.as_text()),
            Some("auto-replied")
        );
    }

    #[test]
    fn delay_warning_says_delayed_and_until_when() {
        let env = Envelope {
            id: "Q3".into(),
            received: 0,
            client: String::new(),
            helo: String::new(),
            mail_from: "alice@site-a.test".into(),
            recipients: vec![],
            size: 0,
            body_8bit: false,
            smtputf8: false,
            ret: Some(crate::smtp::Ret::Full),
            envid: None,
            held: false,
            expired: false,
            receipt: None,
            decoded: None,
            body_crc32: None,
            body_inline: None,
        };
        let f = Failure {
            rcpt: "bob@site-b.test".into(),
            status: "4.4.7".into(),
            diagnostic: "X-Sipmail; call failed".into(),
            remote: None,
            orcpt: None,
        };
        let until = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_350_896);
        let dsn = build(
            "h",
            "Q3",
            &env,
            &[f],
            Returned {
                bytes: b"Subject: s\r\n",
                full: false,
            },
            Kind::Delayed { until },
            SystemTime::now(),
        );
        let msg = mail_parser::MessageParser::default()
            .parse(&dsn)
            .expect("parses");
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let report = String::from_utf8_lossy(msg.parts[2].contents());
        assert!(
            report.contains("Action: delayed\r\nStatus: 4.4.7"),
            "{report}"
        );
        assert!(
            report.contains("Will-Retry-Until: Sun, 22 Nov 2026 12:34:56 +0000"),
            "{report}"
        );
    }

    #[test]
    fn a_hostile_recipient_cannot_inject_headers() {
        let env = Envelope {
            id: "Q2".into(),
            received: 0,
            client: String::new(),
            helo: String::new(),
            mail_from: "a@b\r\nBcc: victim@x".into(),
            recipients: vec![],
            size: 0,
            body_8bit: false,
            smtputf8: false,
            ret: None,
            envid: None,
            held: false,
            expired: false,
            receipt: None,
            decoded: None,
            body_crc32: None,
            body_inline: None,
        };
        let f = Failure {
            rcpt: "x\r\nEvil: 1".into(),
            status: "5.0.0".into(),
            diagnostic: "no".into(),
            remote: None,
            orcpt: None,
        };
        let dsn = build(
            "h",
            "Q2",
            &env,
            &[f],
            Returned {
                bytes: b"",
                full: false,
            },
            Kind::Failed,
            SystemTime::now(),
        );
        let text = String::from_utf8_lossy(&dsn);
        assert!(
            !text.contains("\r\nBcc:") && !text.contains("\r\nEvil:"),
            "{text}"
        );
    }
}
