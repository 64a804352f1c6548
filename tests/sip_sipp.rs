//! Interop: sipp (package sip-tester) sends OPTIONS to an Endpoint-based responder.

use std::time::Duration;

use sipmail::sip::endpoint::{Endpoint, EndpointConfig};
use sipmail::sip::message::{Method, Response};

const SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="sipmail options">
  <send>
    <![CDATA[

      OPTIONS sip:relay@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:relay@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"#;

fn sipp_path() -> String {
    let out = std::process::Command::new("which").arg("sipp").output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => panic!("sipp not found: apt-get install sip-tester"),
    }
}

#[tokio::test]
async fn sipp_options_gets_200() {
    let sipp = sipp_path();
    let (ep, mut rx) = Endpoint::bind("127.0.0.1:0".parse().unwrap(), EndpointConfig::default())
        .await
        .unwrap();
    let responder = tokio::spawn(async move {
        let inc = rx.recv().await.expect("request");
        assert_eq!(inc.request.method, Method::Options);
        inc.respond(Response::for_request(&inc.request, 200, "OK").with_to_tag("sm1"))
            .await
            .unwrap();
        inc.request
    });
    let dir = std::env::temp_dir().join(format!("sipp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let xml = dir.join("options.xml");
    std::fs::write(&xml, SCENARIO).unwrap();
    // A free local port for sipp.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(&sipp)
        .arg("-sf")
        .arg(&xml)
        .arg(format!("127.0.0.1:{}", ep.local_addr().port()))
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", "1", "-nostdin", "-timeout", "10s", "-timeout_error"])
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .expect("sipp hung")
        .expect("sipp did not start");
    assert_eq!(
        out.status.code(),
        Some(0),
        "sipp failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let req = responder.await.unwrap();
    assert_eq!(req.headers.top_via().unwrap().rport, Some(Some(port)));
    ep.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
