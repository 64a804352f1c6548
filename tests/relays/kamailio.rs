//! A real SIP proxy between the relays: Kamailio (Debian package `kamailio`) as site B's
//! proxy, record-routing A's calls to relay B, over UDP and over TCP. The call goes to
//! `sip:mail@site-b.test` at the proxy; ACK and BYE follow the route set through it to
//! the other side's Contact (RFC 3261 §12). The same again with site A finding the proxy
//! in DNS (issue 13): A's `[[peer]]` says `sip = "dns"`, and site B's DNSSEC-signed zone,
//! served by Knot and validated by unbound (see dns_fixture), publishes `_sipmail._udp`
//! (or `_sipmail._tcp`) SRV naming its proxy. The call still goes to
//! `sip:mail@site-b.test`, so a site lets the SIP proxy it already runs route its mail
//! calls: only the SRV record points there. Then a tampering proxy: Kamailio rewrites the
//! answer's `c=` line (where A would connect), or the ACK's confirm, with textops'
//! `subst_body`, and the handshake's signature check refuses the call: nothing delivered,
//! the mail stays queued, the reason is in the relay's events and log.
//!
//! Loopback block 127.0.43.0/24, ports 43000-43999 (each test its own ports); the SRV
//! tests' DNS fixtures on 127.0.42.201-202 and .211-212.

use crate::common::*;
use crate::dns_fixture::{DnsFixture, Zone, srv_line_for};
use sipmail::demo::{TwoSites, maildir_files, make_keys, sample_message, site_config, submit};
use sipmail::relay::{Hooks, RelayEvent};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KAM: &str = "127.0.43.1";
const A_IP: &str = "127.0.43.2";
const B_IP: &str = "127.0.43.3";

/// What the proxy does besides routing.
#[derive(Clone, Copy, PartialEq)]
enum Tamper {
    None,
    /// Rewrite `c=` in the 200 OK: A would connect elsewhere.
    AnswerAddress,
    /// Rewrite the start of the confirm's signature in the ACK.
    ConfirmSignature,
}

/// A Kamailio process of ours; stopped (SIGTERM, then SIGKILL) when dropped.
struct Kamailio {
    child: Child,
    log: PathBuf,
}

impl Kamailio {
    fn start(dir: &Path, port: u16, b_port: u16, tcp: bool, tamper: Tamper) -> Kamailio {
        let bin = ["/usr/sbin/kamailio", "/usr/local/sbin/kamailio"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("kamailio not installed: run integration/install-peers.sh (apt-get install kamailio)");
        let transport = if tcp { ";transport=tcp" } else { "" };
        let (on_reply, tamper_reply, tamper_ack) = match tamper {
            Tamper::None => ("", "", ""),
            Tamper::AnswerAddress => (
                "t_on_reply(\"TAMPER\");",
                r#"onreply_route[TAMPER] {
    if (status == "200") { subst_body('/c=IN IP4 [0-9.]+/c=IN IP4 127.0.43.66/'); xlog("L_NOTICE", "KAM tampered c= of the 200\n"); }
}"#,
                "",
            ),
            Tamper::ConfirmSignature => (
                "",
                "",
                r#"if (is_method("ACK") && subst_body('/sipmail-signature:..../sipmail-signature:AAAA/')) { xlog("L_NOTICE", "KAM tampered the confirm\n"); }"#,
            ),
        };
        let cfg = format!(
            r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
tcp_children=2
auto_aliases=no
listen=udp:{KAM}:{port}
listen=tcp:{KAM}:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
modparam("rr", "enable_full_lr", 1)

request_route {{
    xlog("L_NOTICE", "KAM $rm $ru from $si:$sp proto $pr route=[$hdr(Route)]\n");
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("OPTIONS") && uri == myself) {{ sl_send_reply("200", "OK"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{
            xlog("L_NOTICE", "KAM loose-routed $rm from $si to $ru\n");
            {tamper_ack}
            t_relay();
            exit;
        }}
        if (is_method("ACK") && t_check_trans()) {{ t_relay(); exit; }}
        xlog("L_NOTICE", "KAM in-dialog $rm without our Route: 404\n");
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("INVITE")) record_route();
    $du = "sip:{B_IP}:{b_port}{transport}";
    {on_reply}
    t_relay();
}}

{tamper_reply}
"#
        );
        let cfg_path = dir.join("kamailio.cfg");
        std::fs::write(&cfg_path, cfg).unwrap();
        let run = dir.join("kamailio-run");
        std::fs::create_dir_all(&run).unwrap();
        let log = dir.join("kamailio.log");
        let child = Command::new(bin)
            .arg("-f")
            .arg(&cfg_path)
            .arg("-P")
            .arg(run.join("kamailio.pid"))
            .arg("-Y")
            .arg(&run)
            .args(["-DD", "-E", "-m", "32", "-M", "8"])
            // Its own process group, so that Drop stops its workers too: a worker left
            // behind keeps the test's address and port and fails a later run's kamailio
            // ("Address already in use", seen in a CI run).
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting kamailio");
        let k = Kamailio { child, log };
        k.wait_ready(port);
        k
    }

    /// OPTIONS to the proxy over UDP until it answers 200, within 10 s.
    fn wait_ready(&self, port: u16) {
        let s = std::net::UdpSocket::bind((A_IP, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let me = s.local_addr().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        while Instant::now() < end {
            n += 1;
            let m = format!(
                "OPTIONS sip:{KAM}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKready{n}\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:test@{A_IP}>;tag=r\r\nTo: <sip:{KAM}:{port}>\r\n\
                 Call-ID: ready-{n}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n"
            );
            let _ = s.send_to(m.as_bytes(), (KAM, port));
            let mut buf = [0u8; 2048];
            if let Ok(k) = s.recv(&mut buf)
                && buf[..k].starts_with(b"SIP/2.0 200")
            {
                return;
            }
        }
        panic!(
            "kamailio did not answer OPTIONS within 10 s:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The proxy's own lines (our xlog), for the assertions and a failing test's output.
    fn lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("KAM "))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // The whole group: the main process and every worker it forked.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is still in the group (a worker that outlived the main process).
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How site A finds site B's proxy.
#[derive(Clone, Copy, PartialEq)]
enum Find {
    /// `sip = "sip:mail@127.0.43.1:PORT"` on A's `[[peer]]`.
    Uri,
    /// `sip = "dns"` on A's `[[peer]]`, and a `[dns]` resolver: the validating resolver of
    /// a DNS fixture at 127.0.42.(dns_base+1/2), where site-b.test's signed zone has the
    /// proxy as its `_sipmail._udp` (or, over TCP, `_sipmail._tcp`) SRV target.
    Srv { dns_base: u8 },
}

/// Site B's signed zone: one SRV record, `_sipmail._udp` or `_sipmail._tcp`, to the host
/// `proxy` (Kamailio's address) on the proxy's port.
fn proxy_zone(kam_port: u16, tcp: bool) -> Zone {
    Zone::signed(
        "site-b.test",
        vec![
            srv_line_for(if tcp { "tcp" } else { "udp" }, 10, 10, kam_port, "proxy"),
            format!("proxy IN A {KAM}"),
        ],
    )
}

/// Site A and site B on 127.0.43.2 and .3, A calling B through the proxy at port `base`:
/// by its URI, or (`resolver`) by site-b.test's SRV records.
fn configs(
    dir: &Path,
    base: u16,
    tcp: bool,
    resolver: Option<std::net::SocketAddr>,
) -> (sipmail::config::Config, sipmail::config::Config) {
    make_keys(dir).unwrap();
    let (kam, pa, pb) = (base, base + 1, base + 2);
    let transport = if tcp { ";transport=tcp" } else { "" };
    let static_sip = format!("sip = \"sip:mail@127.0.0.1:{kam}\"");
    let a = site_config(dir, "site-a", "site-b", pa, kam);
    assert!(a.contains(&static_sip), "{a}");
    let a = match resolver {
        None => a.replace(
            &static_sip,
            &format!("sip = \"sip:mail@{KAM}:{kam}{transport}\""),
        ),
        Some(r) => {
            a.replace(&static_sip, "sip = \"dns\"")
                + &format!("[dns]\nresolver = \"{r}\"\ntimeout = \"2s\"\n")
        }
    }
    .replace("127.0.0.1", A_IP);
    let b = site_config(dir, "site-b", "site-a", pb, pa).replace("127.0.0.1", B_IP);
    match resolver {
        None => assert!(
            a.contains(&format!("sip:mail@{KAM}:{kam}{transport}")),
            "{a}"
        ),
        // Nothing in A's configuration says where the proxy is: only DNS does.
        Some(_) => assert!(
            a.contains("sip = \"dns\"") && a.contains("[dns]") && !a.contains(KAM),
            "{a}"
        ),
    }
    (
        sipmail::config::Config::parse("a.toml", &a).unwrap(),
        sipmail::config::Config::parse("b.toml", &b).unwrap(),
    )
}

async fn mail_crosses_the_proxy(base: u16, tcp: bool, find: Find) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let kam = Kamailio::start(dir.path(), base, base + 2, tcp, Tamper::None);
    // Kept until the end: A asks it at each call.
    let dns = match find {
        Find::Uri => None,
        Find::Srv { dns_base } => {
            let dns = DnsFixture::start(dir.path(), dns_base, &[proxy_zone(base, tcp)]);
            // The resolver really validates: AD on B's SRV record.
            let name = if tcp {
                "_sipmail._tcp.site-b.test"
            } else {
                "_sipmail._udp.site-b.test"
            };
            let dig = dns.dig("SRV", name);
            assert!(
                (dig.contains(" ad;") || dig.contains(" ad "))
                    && dig.contains(&format!("10 10 {base} proxy.site-b.test.")),
                "{dig}"
            );
            Some(dns)
        }
    };
    let (a, b) = configs(dir.path(), base, tcp, dns.as_ref().map(|d| d.resolver));
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut events = sites.a.events();
    let msgs: Vec<Vec<u8>> = (0..3).map(|i| sample_message(i, "kamailio")).collect();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let arrived = wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 3).await;
    assert!(
        arrived,
        "{} of 3 arrived; proxy:\n{}",
        maildir_files(&md).len(),
        kam.lines().join("\n")
    );
    // The call ends by idling (call_idle = 2s): A's BYE.
    let ended = wait_event(&mut events, 15, |e| {
        matches!(e, RelayEvent::CallEnded { .. })
    })
    .await;
    assert!(ended.is_some(), "the call did not end");
    // A's BYE, to B's Contact. (Over TCP the source is whatever address the kernel
    // gave the connection, so the Request-URI tells who sent it.)
    let b_contact = format!("sip:mail@{B_IP}:{}", base + 2);
    let bye_seen = wait_until(Duration::from_secs(5), || {
        kam.lines()
            .iter()
            .any(|l| l.contains("loose-routed BYE") && l.contains(&b_contact))
    })
    .await;
    let lines = kam.lines();
    let proto = if tcp { "proto tcp" } else { "proto udp" };
    assert!(
        lines
            .iter()
            .any(|l| l.contains("KAM INVITE sip:mail@site-b.test") && l.contains(proto)),
        "{lines:#?}"
    );
    // ACK and BYE came back to the proxy with its Route, addressed to B's Contact.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("loose-routed ACK") && l.contains(&b_contact)),
        "no ACK loose-routed to B's Contact {b_contact}: {lines:#?}"
    );
    assert!(bye_seen, "no BYE from A through the proxy: {lines:#?}");
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("KAM ACK") || l.contains("KAM BYE"))
            .all(|l| l.contains(&format!("route=[<sip:{KAM}:{base}"))),
        "an in-dialog request came without the proxy's Route: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("without our Route")),
        "{lines:#?}"
    );
    sites.stop().await;
    drop(dns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_crosses_a_record_routing_kamailio_over_udp() {
    mail_crosses_the_proxy(43100, false, Find::Uri).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_crosses_a_record_routing_kamailio_over_tcp() {
    mail_crosses_the_proxy(43200, true, Find::Uri).await;
}

/// Site B's `_sipmail._udp` SRV names its proxy: A, with `sip = "dns"`, calls
/// `sip:mail@site-b.test` there over UDP, and the proxy record-routes it to relay B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_crosses_kamailio_found_by_srv_over_udp() {
    mail_crosses_the_proxy(43600, false, Find::Srv { dns_base: 200 }).await;
}

/// The same with `_sipmail._tcp`: A calls the proxy over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_crosses_kamailio_found_by_srv_over_tcp() {
    mail_crosses_the_proxy(43700, true, Find::Srv { dns_base: 210 }).await;
}

/// Through a tampering proxy: the call fails the signature check, nothing is delivered
/// and the mail stays queued. Returns the reason A's and B's events gave.
async fn tampered(
    base: u16,
    tamper: Tamper,
) -> (tempfile::TempDir, Kamailio, Vec<String>, Vec<String>) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let kam = Kamailio::start(dir.path(), base, base + 2, false, tamper);
    let (a, b) = configs(dir.path(), base, false, None);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut ea = sites.a.events();
    let mut eb = sites.b.events();
    submit(
        sites.a.smtp_addr,
        &[sample_message(0, "tampered")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let failed = wait_event(&mut ea, 20, |e| matches!(e, RelayEvent::CallFailed { .. })).await;
    let mut a_reasons = Vec::new();
    if let Some(RelayEvent::CallFailed { reason, .. }) = failed {
        a_reasons.push(reason);
    }
    let mut b_reasons = Vec::new();
    // Let the BYEs cross, then look.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(e) = eb.try_recv() {
        assert!(
            !matches!(e, RelayEvent::CallEstablished { .. }),
            "B established a tampered call"
        );
        if let RelayEvent::CallFailed { reason, .. } = e {
            b_reasons.push(reason);
        }
    }
    while let Ok(e) = ea.try_recv() {
        assert!(
            !matches!(e, RelayEvent::CallEstablished { .. }),
            "A established a tampered call"
        );
    }
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        maildir_files(&md).is_empty(),
        "a tampered call delivered mail"
    );
    assert_eq!(
        sites.a.queue_snapshot().messages,
        1,
        "the message must stay queued at A"
    );
    sites.stop().await;
    (dir, kam, a_reasons, b_reasons)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_rewrites_the_answers_address_is_refused() {
    let (_dir, kam, a, _) = tampered(43300, Tamper::AnswerAddress).await;
    let lines = kam.lines();
    assert!(
        lines.iter().any(|l| l.contains("tampered c=")),
        "the proxy did not tamper: {lines:#?}"
    );
    assert!(
        a.iter().any(|r| r.contains("signature does not verify")),
        "A's reason: {a:?}"
    );
    // A hung up through the proxy.
    assert!(
        lines.iter().any(|l| l.contains("loose-routed ACK")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_rewrites_the_confirm_is_refused_and_b_hangs_up_through_it() {
    let (_dir, kam, _, b) = tampered(43400, Tamper::ConfirmSignature).await;
    let lines = kam.lines();
    assert!(
        lines.iter().any(|l| l.contains("tampered the confirm")),
        "the proxy did not tamper: {lines:#?}"
    );
    assert!(
        b.iter().any(|r| r.contains("signature")),
        "B's reason: {b:?}"
    );
    // B's BYE followed B's route set (the INVITE's Record-Route) to A's Contact.
    let a_contact = format!("sip:mail@{A_IP}:{}", 43401);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("loose-routed BYE") && l.contains(&a_contact)),
        "no BYE from B through the proxy to {a_contact}: {lines:#?}"
    );
}
