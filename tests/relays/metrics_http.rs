//! The metrics endpoint of two relays in this process, scraped over HTTP: deliveries and
//! tunnel bytes after mail went through, then the failure reasons on both sides of a call
//! refused because the callee no longer holds the caller's cert (reloaded without it), and
//! `/readyz` reporting each partner's last call. (The real-Prometheus test is
//! integration/prometheus.sh.)

use crate::common::*;
use sipmail::demo::{TwoSites, maildir_files, sample_message, submit};
use sipmail::relay::RelayEvent;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path`: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    let status = r[9..12].parse().unwrap();
    let body = r
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap();
    (status, body)
}

/// The value of the series `series` (name and labels exactly as exposed), if present.
async fn value(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, text) = get(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn wait_value(addr: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    for _ in 0..200 {
        if let Some(v) = value(addr, series).await
            && ok(v)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{series} is {:?}\n{}",
        value(addr, series).await,
        get(addr, "/metrics").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_and_failure_reasons_on_both_sides() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let on = |s: String| format!("{s}[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let (a, b) = edited_configs(dir.path(), on, on);
    let sites = TwoSites::start_with(dir.path(), a, b, sipmail::relay::Hooks::default())
        .await
        .unwrap();
    let (ma, mb) = (sites.a.metrics_addr.unwrap(), sites.b.metrics_addr.unwrap());
    let mut events = sites.a.events();

    let msgs: Vec<Vec<u8>> = (0..2).map(|i| sample_message(i, "metrics")).collect();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 2).await);
    wait_value(
        ma,
        "sipmail_messages_delivered_total{route=\"site-b.test\"}",
        |v| v == 2.0,
    )
    .await;
    wait_value(
        mb,
        "sipmail_messages_delivered_total{route=\"local\"}",
        |v| v == 2.0,
    )
    .await;
    let out = wait_value(
        ma,
        "sipmail_tunnel_bytes_total{peer=\"site-b.test\",direction=\"out\"}",
        |v| v > 0.0,
    )
    .await;
    let received = wait_value(
        mb,
        "sipmail_tunnel_bytes_total{peer=\"site-a.test\",direction=\"in\"}",
        |v| v > 0.0,
    )
    .await;
    assert_eq!(out, received, "what A wrote is what B read");
    wait_value(ma, "sipmail_queue_messages{route=\"site-b.test\"}", |v| {
        v == 0.0
    })
    .await;

    // B forgets A's cert and reloads; once A's calls have gone idle, its next call is refused.
    let certs = dir.path().join("keyring/site-b/certs");
    for f in std::fs::read_dir(&certs).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    sites.b.reload().await.unwrap();
    // Every call A placed ends after call_idle (2 s).
    let (mut up, mut ended) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while up == 0 || ended < up {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's calls did not end ({ended} of {up})"
        );
        match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
            Ok(Ok(RelayEvent::CallEstablished { .. })) => up += 1,
            Ok(Ok(RelayEvent::CallEnded { .. })) => ended += 1,
            _ => {}
        }
    }
    submit(
        sites.a.smtp_addr,
        &[sample_message(3, "refused")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    wait_value(
        ma,
        "sipmail_calls_failed_total{peer=\"site-b.test\",direction=\"outgoing\",reason=\"4xx\"}",
        |v| v >= 1.0,
    )
    .await;
    wait_value(
        mb,
        "sipmail_calls_failed_total{peer=\"site-a.test\",direction=\"incoming\",reason=\"unknown_key\"}",
        |v| v >= 1.0,
    )
    .await;
    wait_value(ma, "sipmail_queue_messages{route=\"site-b.test\"}", |v| {
        v == 1.0
    })
    .await;
    assert_eq!(
        value(ma, "sipmail_peer_last_call_success{peer=\"site-b.test\"}").await,
        Some(0.0)
    );
    let (status, body) = get(ma, "/readyz").await;
    assert_eq!(
        status, 200,
        "a partner's trouble does not make us unready: {body}"
    );
    assert!(
        body.contains("partner site-b.test: last call (outgoing) failed (4xx)"),
        "{body}"
    );
    // At B the refused call proved nothing about its caller: A's last call stays the one
    // that came up.
    let (status, body) = get(mb, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("partner site-a.test: last call (incoming) came up"),
        "{body}"
    );
    assert_eq!(get(ma, "/healthz").await, (200, "ok\n".to_string()));
    sites.stop().await;
}
