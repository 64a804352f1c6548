//! `[metrics]`: the HTTP endpoint for Prometheus and the health checks. Off unless the
//! section is there; loopback only unless `allow_remote = true`, because the endpoint
//! has no authentication and tells whoever asks about the partners and the queue.

use super::raw::RawMetrics;
use super::{ConfigError, Errors, socket};
use std::net::SocketAddr;

/// The `[metrics]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSection {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// A non-loopback `listen` was allowed on purpose.
    pub allow_remote: bool,
}

pub(super) fn parse_metrics(
    raw: Option<&RawMetrics>,
    e: Errors<'_>,
) -> Result<Option<MetricsSection>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let listen = socket(e, "metrics.listen", &raw.listen)?;
    let allow_remote = raw.allow_remote.unwrap_or(false);
    if !listen.ip().is_loopback() && !allow_remote {
        return Err(e.bad(
            "metrics.listen",
            format!(
                "{listen} is not a loopback address; the metrics endpoint has no authentication, \
                 so bind it to 127.0.0.1 or [::1], or set metrics.allow_remote = true to expose it on purpose"
            ),
        ));
    }
    Ok(Some(MetricsSection {
        listen,
        allow_remote,
    }))
}
