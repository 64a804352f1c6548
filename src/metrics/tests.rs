//! The registry's exposition and the endpoint over a real socket.

use super::*;
use std::sync::Arc;

#[test]
fn labels_stay_bounded_and_the_exposition_has_every_family() {
    let m = Metrics::new(vec!["Site-B.test".to_string()]);
    assert_eq!(m.peer_label("site-b.TEST"), "site-b.test");
    assert_eq!(m.peer_label("evil.example"), OTHER_PEER);
    m.accepted(Some("site-b.test"), 2);
    m.accepted(RouteLabel::Local, 1);
    m.delivered(Some("site-b.test"));
    m.deferred(Some("site-b.test"));
    m.bounced(RouteLabel::Local);
    m.delivered(RouteLabel::NextHop("smarthost.example", 25));
    m.call_placed("site-b.test");
    m.call_failed("site-b.test", Direction::Outgoing, CallFailure::Status4xx);
    m.call_failed("evil.example", Direction::Incoming, CallFailure::Policy);
    m.call_answered("site-b.test");
    m.call_established("site-b.test", Direction::Incoming, "matched");
    m.call_setup("site-b.test", Duration::from_millis(20));
    m.transferred(Some("site-b.test"), Duration::from_millis(3));
    let c = m.tunnel_counters("site-b.test");
    c.read.inc_by(100);
    c.written.inc_by(300);
    m.set_queue(&[(RouteLabel::Peer("site-b.test"), 3, Duration::from_secs(42))]);
    let text = m.scrape(|_| {}).unwrap();
    for line in [
        "sipmail_messages_accepted_total{route=\"site-b.test\"} 2",
        "sipmail_messages_accepted_total{route=\"local\"} 1",
        "sipmail_messages_delivered_total{route=\"site-b.test\"} 1",
        "sipmail_messages_deferred_total{route=\"site-b.test\"} 1",
        "sipmail_messages_bounced_total{route=\"local\"} 1",
        "sipmail_messages_delivered_total{route=\"smtp:[smarthost.example]:25\"} 1",
        "sipmail_calls_placed_total{peer=\"site-b.test\"} 1",
        "sipmail_calls_failed_total{peer=\"site-b.test\",direction=\"outgoing\",reason=\"4xx\"} 1",
        "sipmail_calls_failed_total{peer=\"other\",direction=\"incoming\",reason=\"policy\"} 1",
        "sipmail_calls_answered_total{peer=\"site-b.test\"} 1",
        "sipmail_calls_established_total{peer=\"site-b.test\",direction=\"incoming\"} 1",
        "sipmail_key_continuity_total{peer=\"site-b.test\",outcome=\"matched\"} 1",
        "sipmail_call_setup_seconds_count{peer=\"site-b.test\"} 1",
        "sipmail_message_transfer_seconds_count{route=\"site-b.test\"} 1",
        "sipmail_tunnel_bytes_total{peer=\"site-b.test\",direction=\"in\"} 100",
        "sipmail_tunnel_bytes_total{peer=\"site-b.test\",direction=\"out\"} 300",
        "sipmail_queue_messages{route=\"site-b.test\"} 3",
        "sipmail_queue_messages{route=\"local\"} 0",
        "sipmail_queue_oldest_message_age_seconds{route=\"site-b.test\"} 42",
        "sipmail_peer_last_call_success{peer=\"site-b.test\"} 1",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // The unknown caller's call is not a partner's last call.
    assert_eq!(m.last_calls().keys().collect::<Vec<_>>(), ["site-b.test"]);
    // Nor is a failed incoming call that claims to come from the partner: it proved nothing.
    m.call_failed("site-b.test", Direction::Incoming, CallFailure::Signature);
    assert_eq!(m.last_calls()["site-b.test"].failure, None);
    m.call_failed("site-b.test", Direction::Outgoing, CallFailure::Timeout);
    assert_eq!(
        m.last_calls()["site-b.test"].failure,
        Some(CallFailure::Timeout)
    );
    // The queue gauges are replaced, not added to, at the next scrape.
    m.set_queue(&[]);
    let text = m.scrape(|_| {}).unwrap();
    assert!(
        text.contains("sipmail_queue_messages{route=\"site-b.test\"} 0"),
        "{text}"
    );
}

struct Fake {
    ready: std::sync::Mutex<Result<String, String>>,
}

impl http::Probe for Fake {
    fn refresh(&self, m: &Metrics) {
        m.set_queue(&[(RouteLabel::Local, 7, Duration::from_secs(1))]);
    }
    fn ready(&self) -> Result<String, String> {
        self.ready.lock().unwrap().clone()
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn the_endpoint_serves_metrics_health_and_readiness() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let probe = Arc::new(Fake {
        ready: std::sync::Mutex::new(Ok("all good\n".into())),
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let server = tokio::spawn(http::serve(
        listener,
        Arc::new(Metrics::new(Vec::new())),
        probe.clone(),
        async move { s.notified().await },
    ));
    let r = get(addr, "/metrics").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{r}"
    );
    assert!(
        r.contains("sipmail_queue_messages{route=\"local\"} 7"),
        "refreshed: {r}"
    );
    let r = get(addr, "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
    let r = get(addr, "/readyz").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("ready\nall good\n"),
        "{r}"
    );
    *probe.ready.lock().unwrap() = Err("the spool is not writable: no\n".into());
    let r = get(addr, "/readyz").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(
        r.ends_with("not ready\nthe spool is not writable: no\n"),
        "{r}"
    );
    let r = get(addr, "/nothing").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    stop.notify_one();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("stops when told")
        .unwrap();
}
