//! A real DNSSEC test bed on loopback: Knot (`knotd`) serves zones signed with ldns
//! (`ldns-keygen`, `ldns-signzone`) on 127.0.42.N+1:42053, and unbound validates them on
//! 127.0.42.N+2:42053 with each signed zone's KSK as its trust anchor (`.test` is not a
//! default local zone there: `local-zone: "test." nodefault`). A zone may be served with a
//! record changed after signing (its signature then fails: bogus), or unsigned (insecure).
//! Both daemons are children of the test, killed by PID on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DNS_PORT: u16 = 42053;
pub const SIP_PORT: u16 = 42060;

/// Which record a tampered zone has changed after signing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    None,
    /// The first SRV record's port.
    Srv,
    /// The OPENPGPKEY record's data.
    Key,
}

#[derive(Clone, Debug)]
pub struct Zone {
    pub name: String,
    /// Zone-file lines after the SOA and NS (owner names relative to the zone).
    pub records: Vec<String>,
    pub signed: bool,
    pub tamper: Edit,
}

impl Zone {
    pub fn signed(name: &str, records: Vec<String>) -> Zone {
        Zone {
            name: name.into(),
            records,
            signed: true,
            tamper: Edit::None,
        }
    }
}

/// The OPENPGPKEY line for `mail@<zone>` with `key` (binary transferable public key),
/// in RFC 3597 generic form (any zone parser reads it).
pub fn openpgpkey_line(key: &[u8]) -> String {
    format!(
        "00d8d3f11739d2f3537099982b4674c29fc59a8fda350fca1379613a._openpgpkey IN TYPE61 \\# {} {}",
        key.len(),
        hex::encode(key)
    )
}

/// `_sipmail._udp` SRV to `target` (relative or absolute) and port.
pub fn srv_line(prio: u16, weight: u16, port: u16, target: &str) -> String {
    srv_line_for("udp", prio, weight, port, target)
}

/// `_sipmail._<transport>` SRV (`transport` "udp" or "tcp") to `target` and port.
pub fn srv_line_for(transport: &str, prio: u16, weight: u16, port: u16, target: &str) -> String {
    assert!(
        matches!(transport, "udp" | "tcp"),
        "sipmail's SRV services are _sipmail._udp and _sipmail._tcp, not {transport}"
    );
    format!("_sipmail._{transport} IN SRV {prio} {weight} {port} {target}")
}

pub struct DnsFixture {
    pub dir: PathBuf,
    /// 127.0.42.`base`: knot at base+1, unbound at base+2.
    pub base: u8,
    pub auth: SocketAddr,
    pub resolver: SocketAddr,
    knot: Option<Child>,
    unbound: Option<Child>,
}

pub fn ip(base: u8, n: u8) -> String {
    format!("127.0.42.{}", base + n)
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (integration/install-peers.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl DnsFixture {
    pub fn start(dir: &Path, base: u8, zones: &[Zone]) -> DnsFixture {
        let dir = dir.join("dns");
        let mut f = DnsFixture {
            auth: format!("{}:{DNS_PORT}", ip(base, 1)).parse().unwrap(),
            resolver: format!("{}:{DNS_PORT}", ip(base, 2)).parse().unwrap(),
            dir,
            base,
            knot: None,
            unbound: None,
        };
        f.serve(zones);
        f
    }

    /// (Re)write, sign and serve `zones`, with a fresh resolver (empty cache).
    pub fn serve(&mut self, zones: &[Zone]) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(self.dir.join("kdb")).unwrap();
        let d = self.dir.clone();
        let mut anchors = String::new();
        let mut knot_zones = String::new();
        for z in zones {
            let zd = d.join(&z.name);
            std::fs::create_dir_all(&zd).unwrap();
            let mut text = format!(
                "$ORIGIN {n}.\n$TTL 5\n@ IN SOA ns.{n}. admin.{n}. 1 3600 600 86400 5\n@ IN NS ns\nns IN A {ip}\n",
                n = z.name,
                ip = self.auth.ip()
            );
            for r in &z.records {
                text.push_str(r);
                text.push('\n');
            }
            let file = zd.join("zone");
            std::fs::write(&file, text).unwrap();
            let served = if z.signed {
                let zsk = run(&zd, "ldns-keygen", &["-a", "ECDSAP256SHA256", &z.name]);
                let ksk = run(
                    &zd,
                    "ldns-keygen",
                    &["-a", "ECDSAP256SHA256", "-k", &z.name],
                );
                run(&zd, "ldns-signzone", &["zone", &zsk, &ksk]);
                anchors.push_str(&std::fs::read_to_string(zd.join(format!("{ksk}.key"))).unwrap());
                let signed = zd.join("zone.signed");
                if z.tamper != Edit::None {
                    tamper(&signed, z.tamper);
                }
                signed
            } else {
                file
            };
            knot_zones.push_str(&format!(
                "  - domain: {}\n    file: \"{}\"\n    journal-content: none\n    zonefile-sync: -1\n",
                z.name,
                served.display()
            ));
        }
        std::fs::write(
            d.join("knot.conf"),
            format!(
                "server:\n    listen: {auth}@{DNS_PORT}\n    rundir: \"{dir}\"\ndatabase:\n    storage: \"{dir}/kdb\"\nlog:\n  - target: stderr\n    any: warning\nzone:\n{knot_zones}",
                auth = self.auth.ip(),
                dir = d.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("anchors"), &anchors).unwrap();
        let mut stubs = String::new();
        for z in zones {
            stubs.push_str(&format!(
                "stub-zone:\n    name: \"{}\"\n    stub-addr: {}@{DNS_PORT}\n",
                z.name,
                self.auth.ip()
            ));
        }
        std::fs::write(
            d.join("unbound.conf"),
            format!(
                r#"server:
    interface: {res}@{DNS_PORT}
    port: {DNS_PORT}
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    use-syslog: no
    logfile: "{dir}/unbound.log"
    verbosity: 1
    val-log-level: 2
    module-config: "validator iterator"
    trust-anchor-file: "{dir}/anchors"
    local-zone: "test." nodefault
    do-ip6: no
    num-threads: 1
    so-reuseport: no
    ede: yes
{stubs}remote-control:
    control-enable: no
"#,
                res = self.resolver.ip(),
                dir = d.display()
            ),
        )
        .unwrap();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        self.knot = Some(
            Command::new("knotd")
                .arg("-c")
                .arg(d.join("knot.conf"))
                .stdout(Stdio::null())
                .stderr(log("knot.log"))
                .spawn()
                .expect("knotd (apt-get install knot)"),
        );
        // The authoritative server first: a resolver that asks before knot listens caches
        // the failure (a DNSKEY it could not fetch stays "bogus" for val-bogus-ttl).
        for z in zones {
            self.wait_for(self.auth, &z.name, "SOA", false, &[]);
        }
        // Then the resolver, ready when every zone's DNSKEY (signed zones) or SOA
        // (unsigned) resolves; a signed one must validate (the AD flag). Under load a
        // fetch can time out once and be cached as bogus; a fresh resolver (empty cache)
        // is started then, at most three times, so every test starts from a resolver that
        // validated each zone's keys.
        for attempt in 1..=3 {
            self.start_unbound();
            let bad: Vec<String> = zones
                .iter()
                .filter(|z| {
                    let rtype = if z.signed { "DNSKEY" } else { "SOA" };
                    !self.wait_for(self.resolver, &z.name, rtype, z.signed, &["SERVFAIL"])
                })
                .map(|z| z.name.clone())
                .collect();
            if bad.is_empty() {
                return;
            }
            eprintln!(
                "dns fixture: attempt {attempt}: the resolver did not validate {bad:?}; unbound's log:\n{}",
                self.logs()
            );
            if let Some(mut c) = self.unbound.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        panic!(
            "the DNS fixture's resolver did not validate its zones in three tries:\n{}",
            self.logs()
        );
    }

    fn start_unbound(&mut self) {
        let d = &self.dir;
        let _ = std::fs::remove_file(d.join("unbound.log"));
        self.unbound = Some(
            Command::new("unbound")
                .arg("-d")
                .arg("-c")
                .arg(d.join("unbound.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("unbound.stderr")).unwrap())
                .spawn()
                .expect("unbound (apt-get install unbound)"),
        );
    }

    /// knot's and unbound's logs, for a failure message.
    pub fn logs(&self) -> String {
        ["knot.log", "unbound.stderr", "unbound.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Ask `server` for `rtype name` until it answers NOERROR (with the AD flag when
    /// `secure`), bounded at 10 s. Returns false early on a status in `give_up`; panics
    /// with the logs when the server never answers.
    fn wait_for(
        &self,
        server: SocketAddr,
        name: &str,
        rtype: &str,
        secure: bool,
        give_up: &[&str],
    ) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("kdig")
                .args([
                    &format!("@{}", server.ip()),
                    "-p",
                    &DNS_PORT.to_string(),
                    "+time=1",
                    "+retry=0",
                    "+dnssec",
                    rtype,
                    name,
                ])
                .output()
                .expect("kdig (apt-get install knot-dnsutils)");
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("status: NOERROR") {
                let flags = text
                    .lines()
                    .find(|l| l.starts_with(";; Flags:"))
                    .unwrap_or_default();
                return !secure
                    || flags
                        .split(|c: char| c.is_whitespace() || c == ';')
                        .any(|f| f == "ad");
            }
            if give_up
                .iter()
                .any(|s| text.contains(&format!("status: {s}")))
            {
                return false;
            }
            assert!(
                Instant::now() < end,
                "the DNS fixture's server at {server} did not answer {rtype} {name}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The flags line of `kdig +dnssec TYPE NAME` through the resolver (";; Flags: ...").
    pub fn dig(&self, rtype: &str, name: &str) -> String {
        let out = Command::new("kdig")
            .args([
                &format!("@{}", self.resolver.ip()),
                "-p",
                &DNS_PORT.to_string(),
                "+dnssec",
                rtype,
                name,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn stop(&mut self) {
        for c in [self.knot.take(), self.unbound.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for DnsFixture {
    fn drop(&mut self) {
        // A failing test's temporary folder goes with it: keep the servers' logs.
        if std::thread::panicking() {
            eprintln!("dns fixture logs at the failure:\n{}", self.logs());
        }
        self.stop();
    }
}

/// Change a record of a signed zone file without signing again.
fn tamper(path: &Path, what: Edit) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut done = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if done || f.len() < 4 {
                return l.to_string();
            }
            match (what, f[3]) {
                (Edit::Srv, "SRV") => {
                    done = true;
                    let port: u16 = f[6].parse().unwrap();
                    format!(
                        "{} {} {} SRV {} {} {} {}",
                        f[0],
                        f[1],
                        f[2],
                        f[4],
                        f[5],
                        port + 1,
                        f[7]
                    )
                }
                (Edit::Key, "OPENPGPKEY") => {
                    done = true;
                    // Change the first character of the base64 data (the key's first
                    // octet): a record that still parses, whose signature no longer fits.
                    let mut data: Vec<char> = f[4].chars().collect();
                    data[0] = if data[0] == 'm' { 'n' } else { 'm' };
                    let data: String = data.into_iter().collect();
                    format!(
                        "{} {} {} OPENPGPKEY {data} {}",
                        f[0],
                        f[1],
                        f[2],
                        f[5..].join(" ")
                    )
                }
                _ => l.to_string(),
            }
        })
        .collect();
    assert!(
        done,
        "nothing to tamper with ({what:?}) in {}",
        path.display()
    );
    std::fs::write(path, out.join("\n") + "\n").unwrap();
}
