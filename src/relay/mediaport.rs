//! The media listener of an incoming call: any free port, or one in `sip.media_ports` (the
//! range a firewall opens or a NAT forwards), tried from a random place so that calls
//! spread over the range; a port in use is skipped.

use crate::config::PortRange;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MediaPortError {
    #[error("no free media port in sip.media_ports ({0}): every port is in use")]
    Busy(PortRange),
    #[error("cannot open a media port on {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A listener on `ip`, on a port in `range` (None: any port). Each port of the range is
/// tried at most once.
pub(crate) async fn bind(
    ip: IpAddr,
    range: Option<PortRange>,
) -> Result<TcpListener, MediaPortError> {
    let Some(range) = range else {
        let addr = SocketAddr::new(ip, 0);
        return crate::listen::tcp(addr).map_err(|source| MediaPortError::Io { addr, source });
    };
    let count = u32::from(range.last - range.first) + 1;
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let start = u32::from_be_bytes(r) % count;
    for i in 0..count {
        // first + (start + i) % count <= last <= u16::MAX
        let port = range.first + ((start + i) % count) as u16;
        let addr = SocketAddr::new(ip, port);
        match crate::listen::tcp(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
            Err(source) => return Err(MediaPortError::Io { addr, source }),
        }
    }
    Err(MediaPortError::Busy(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_ports_of_the_range_until_none_is_free() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // A range of free ports: find 3 consecutive ones.
        let mut held = Vec::new();
        let range = 'found: {
            for first in (41000u16..60000).step_by(7) {
                let r = PortRange {
                    first,
                    last: first + 2,
                };
                let mut ok = Vec::new();
                for p in r.ports() {
                    match std::net::TcpListener::bind((ip, p)) {
                        Ok(l) => ok.push(l),
                        Err(_) => break,
                    }
                }
                if ok.len() == 3 {
                    drop(ok);
                    break 'found r;
                }
            }
            panic!("no 3 consecutive free ports");
        };
        for _ in 0..3 {
            let l = bind(ip, Some(range)).await.unwrap();
            let port = l.local_addr().unwrap().port();
            assert!(range.ports().contains(&port), "{port} outside {range}");
            held.push(l);
        }
        let e = bind(ip, Some(range)).await.unwrap_err();
        assert!(matches!(e, MediaPortError::Busy(_)), "{e}");
        assert!(
            e.to_string()
                .contains("no free media port in sip.media_ports"),
            "{e}"
        );
        held.pop();
        assert!(bind(ip, Some(range)).await.is_ok());
        // No range: any port, as before.
        assert!(bind(ip, None).await.is_ok());
    }
}
