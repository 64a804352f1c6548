//! `[smtp]`: the listener the site's MTA hands mail to.

use super::raw::RawSmtp;
use super::values::Cidr;
use super::{ConfigError, Errors, socket};
use crate::smtp::ServerConfig;
use std::net::SocketAddr;

/// The `[smtp]` section, as the SMTP listener needs it.
#[derive(Clone, Debug)]
pub struct SmtpSection {
    pub listen: SocketAddr,
    /// Who may connect (default `127.0.0.0/8` and `::1/128`, see `raw.rs`).
    pub allow: Vec<Cidr>,
    /// Default: the SMTP server's own ([`ServerConfig::default`]).
    pub max_message_size: u64,
    /// Default: the SMTP server's own ([`ServerConfig::default`]).
    pub max_recipients: usize,
}

pub(super) fn parse_smtp(raw: &RawSmtp, e: Errors<'_>) -> Result<SmtpSection, ConfigError> {
    let listen = socket(e, "smtp.listen", &raw.listen)?;
    let allow = raw
        .allow
        .iter()
        .map(|c| Cidr::parse(c).map_err(|m| e.bad("smtp.allow", m)))
        .collect::<Result<Vec<_>, _>>()?;
    let server = ServerConfig::default();
    Ok(SmtpSection {
        listen,
        allow,
        max_message_size: raw.max_message_size.unwrap_or(server.max_message_size),
        max_recipients: raw.max_recipients.unwrap_or(server.max_recipients),
    })
}
