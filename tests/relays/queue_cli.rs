//! `sipmail queue` against a running daemon (control socket) and against the spool files
//! when no daemon runs; and one spool, one daemon.

use crate::common::*;
use sipmail::config::Config;
use sipmail::demo::{free_port, make_keys, sample_message, site_config, submit};
use sipmail::relay::{self, Hooks, Shutdown};
use std::process::Command;
use std::time::Duration;

fn queue(cfg: &std::path::Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_show_retry_delete() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    make_keys(dir.path()).unwrap();
    // Site B never runs: A's mail waits in the queue.
    let text = site_config(
        dir.path(),
        "site-a",
        "site-b",
        free_port().unwrap(),
        free_port().unwrap(),
    )
    .replace("retry_initial = \"1s\"", "retry_initial = \"1h\"")
    .replace("retry_max = \"5s\"", "retry_max = \"2h\"");
    let path = dir.path().join("site-a.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let sd = Shutdown::new();
    let a = relay::start(cfg.clone(), sd.clone(), Hooks::default())
        .await
        .unwrap();
    submit(
        a.smtp_addr,
        &[sample_message(1, "q"), sample_message(2, "q")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let ids: Vec<String> = a.queue_snapshot_ids();
    assert_eq!(ids.len(), 2);

    let (ok, out) = queue(&path, &["list"]);
    assert!(ok, "{out}");
    assert!(out.contains(&ids[0]) && out.contains(&ids[1]), "{out}");
    assert!(
        out.contains("<bob@site-b.test> via peer site-b.test: pending"),
        "{out}"
    );
    assert!(out.contains("running daemon"), "{out}");
    let (ok, out) = queue(&path, &["show", &ids[0]]);
    assert!(ok && out.contains("Subject: sipmail demo message"), "{out}");
    let (ok, out) = queue(&path, &["--json", "list"]);
    assert!(ok && out.contains("\"result\": \"messages\""), "{out}");
    let (ok, out) = queue(&path, &["retry"]);
    assert!(ok && out.contains("2 message(s) affected"), "{out}");
    let (ok, out) = queue(&path, &["delete", &ids[1]]);
    assert!(ok, "{out}");
    assert!(wait_until(Duration::from_secs(2), || a.queue_snapshot().messages == 1).await);
    let (ok, out) = queue(&path, &["show", "NOSUCHID"]);
    assert!(!ok && out.contains("no message NOSUCHID"), "{out}");

    // One spool, one daemon.
    let second = relay::start(cfg.clone(), Shutdown::new(), Hooks::default()).await;
    let err = second
        .err()
        .expect("a second daemon on the same spool must be refused")
        .to_string();
    assert!(err.contains("another sipmail daemon is running"), "{err}");

    sd.trigger();
    a.wait().await;
    // No daemon: the spool files.
    let (ok, out) = queue(&path, &["list"]);
    assert!(ok, "{out}");
    assert!(out.contains(&ids[0]) && !out.contains(&ids[1]), "{out}");
    assert!(out.contains("no daemon is running"), "{out}");
    let (ok, out) = queue(&path, &["delete", &ids[0]]);
    assert!(ok, "{out}");
    let (_, out) = queue(&path, &["list"]);
    assert!(out.contains("The queue is empty"), "{out}");
}
