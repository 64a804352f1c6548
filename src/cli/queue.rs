//! `sipmail queue`: list, show, retry, delete, hold, release and expire queued messages.

use super::QueueCmd;
use anyhow::{Result, bail};
use sipmail::config::Config;
use sipmail::queue::{Envelope, RcptState, now_ms};
use sipmail::relay::control::{self, ControlReply, ControlRequest};
use std::collections::BTreeMap;
use std::process::ExitCode;

pub async fn run(cfg: &Config, cmd: QueueCmd, json: bool) -> Result<ExitCode> {
    // What "N message(s)" means for each command, live and with no daemon.
    let (done, done_offline) = match &cmd {
        QueueCmd::Hold { .. } => ("held", "held"),
        QueueCmd::Release { .. } => (
            "released: tried now",
            "released: tried when the daemon starts",
        ),
        QueueCmd::Expire { .. } => (
            "expired: returned to the sender with a delivery status notification",
            "marked expired: the daemon returns them to the sender when it starts",
        ),
        _ => ("affected", "affected"),
    };
    let req = match cmd {
        QueueCmd::List => ControlRequest::List,
        QueueCmd::Show { id } => ControlRequest::Show { id },
        QueueCmd::Retry { id } => ControlRequest::Retry { id },
        QueueCmd::Delete { id } => ControlRequest::Delete { id },
        QueueCmd::Hold { ids, all } => ControlRequest::Hold { ids, all },
        QueueCmd::Release { ids, all } => ControlRequest::Release { ids, all },
        QueueCmd::Expire { ids, all } => ControlRequest::Expire { ids, all },
    };
    let (reply, live) = match control::request(&cfg.spool, &req).await? {
        Some(r) => (r, true),
        None => (control::offline(&cfg.spool, &req).await?, false),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(if matches!(reply, ControlReply::Error { .. }) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let source = if live {
        "running daemon"
    } else {
        "spool files (no daemon is running)"
    };
    match reply {
        ControlReply::Messages { messages } => print_list(&messages, source),
        ControlReply::Message { envelope, headers } => {
            print_one(&envelope);
            println!("\n{}", headers.trim_end());
        }
        ControlReply::Done { count } => println!(
            "{count} message(s) {} ({source})",
            if live { done } else { done_offline }
        ),
        ControlReply::Reloaded { message } => println!("{message}"),
        ControlReply::Error { message } => bail!("{message}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn age(secs: u64) -> String {
    let now = now_ms() / 1000;
    let a = now.saturating_sub(secs);
    match a {
        0..60 => format!("{a}s"),
        60..3600 => format!("{}m", a / 60),
        3600..86400 => format!("{}h{:02}m", a / 3600, a % 3600 / 60),
        _ => format!("{}d{:02}h", a / 86400, a % 86400 / 3600),
    }
}

fn next(ms: u64) -> String {
    let now = now_ms();
    if ms <= now {
        "now".into()
    } else {
        format!("in {}s", (ms - now).div_ceil(1000))
    }
}

fn print_one(e: &Envelope) {
    let mark = if e.expired {
        "  EXPIRED"
    } else if e.held {
        "  HELD"
    } else {
        ""
    };
    println!(
        "{}{mark}  {} bytes  {} ago  from <{}>  ({})",
        e.id,
        e.size,
        age(e.received),
        e.mail_from,
        e.client
    );
    for r in &e.recipients {
        let state = match r.state {
            RcptState::Pending if e.held => format!(
                "pending, {} attempt(s), held (sipmail queue release {})",
                r.attempts, e.id
            ),
            RcptState::Pending => format!(
                "pending, {} attempt(s), next {}",
                r.attempts,
                next(r.next_attempt_ms)
            ),
            RcptState::Delivered => "delivered".into(),
            RcptState::Failed => "failed".into(),
        };
        println!("    <{}> via {}: {}", r.addr, r.route, state);
        if let Some(err) = &r.last_error {
            println!("        last error: {err}");
        }
        if let Some(p) = r.pin.as_ref().filter(|_| r.state == RcptState::Pending) {
            let other = match next(p.until_ms) {
                n if n == "now" => "the hold (queue.resend_hold) is over".to_string(),
                n => format!("the peer's other relays are tried {n}"),
            };
            println!(
                "        kept for relay {}, which may hold it (no reply came after the end of the message); {other}",
                p.relay
            );
        }
    }
}

fn print_list(messages: &[Envelope], source: &str) {
    if messages.is_empty() {
        println!("The queue is empty ({source}).");
        return;
    }
    let mut per_route: BTreeMap<String, (usize, Option<String>)> = BTreeMap::new();
    for e in messages {
        print_one(e);
        for r in e.pending() {
            let entry = per_route.entry(r.route.to_string()).or_default();
            entry.0 += 1;
            if r.last_error.is_some() {
                entry.1.clone_from(&r.last_error);
            }
        }
    }
    let bytes: u64 = messages.iter().map(|e| e.size).sum();
    println!(
        "\n{} message(s), {} bytes ({source})",
        messages.len(),
        bytes
    );
    for (route, (n, err)) in per_route {
        match err {
            Some(e) => println!("  {route}: {n} recipient(s) pending; last error: {e}"),
            None => println!("  {route}: {n} recipient(s) pending"),
        }
    }
}
